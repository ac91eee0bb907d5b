// Helpers for the loader tests: temp dirs, raw safetensors images, a tiny Qwen3-MoE checkpoint.
#pragma once
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "loader/safetensors.h"

namespace cpinfer::test {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "cpinfer-loader-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.good()) throw std::runtime_error("cannot write " + path);
}

// A safetensors image from a header string and a data region; `header_len` overrides the
// 8-byte size field (to fake corrupt sizes).
inline void write_raw_safetensors(const std::string& path, const std::string& header, size_t data_bytes,
                                  int64_t header_len = -1) {
  uint64_t n = header_len < 0 ? header.size() : static_cast<uint64_t>(header_len);
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  bytes += header;
  bytes.append(data_bytes, '\x01');
  write_text(path, bytes);
}

// Runs `fn`, which must throw cpinfer::Error; returns the message ("" and a failure otherwise).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const cpinfer::Error& e) {
    if (std::getenv("CPINFER_SHOW_ERRORS")) std::fprintf(stderr, "  error: %s\n", e.what());
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-cpinfer exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected a cpinfer::Error, nothing was thrown";
  return "";
}

#define EXPECT_ERROR_HAS(stmt, ...)                                                           \
  do {                                                                                        \
    std::string msg_ = ::cpinfer::test::error_of([&] { stmt; });                              \
    for (const std::string& part_ : std::vector<std::string>{__VA_ARGS__})                    \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "'" << part_ << "' not in: " << msg_; \
  } while (0)

// ---- a tiny Qwen3-MoE model: 3 layers (layer 1 dense through mlp_only_layers), 4 experts.
struct TinyShape {
  int64_t vocab = 32, hidden = 16, layers = 3, heads = 4, kv_heads = 2, head_dim = 8;
  int64_t experts = 4, top_k = 2, moe_inter = 6, inter = 12;
};

inline std::string tiny_config_json(const TinyShape& s = {}, bool tie = false) {
  return std::string("{\n") + R"("architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",)" +
         "\"vocab_size\": " + std::to_string(s.vocab) + ", \"hidden_size\": " + std::to_string(s.hidden) +
         ", \"num_hidden_layers\": " + std::to_string(s.layers) +
         ", \"num_attention_heads\": " + std::to_string(s.heads) +
         ", \"num_key_value_heads\": " + std::to_string(s.kv_heads) + ", \"head_dim\": " + std::to_string(s.head_dim) +
         ", \"num_experts\": " + std::to_string(s.experts) + ", \"num_experts_per_tok\": " + std::to_string(s.top_k) +
         ", \"moe_intermediate_size\": " + std::to_string(s.moe_inter) +
         ", \"intermediate_size\": " + std::to_string(s.inter) +
         R"(, "mlp_only_layers": [1], "decoder_sparse_step": 1, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
  "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rope_scaling": null, "torch_dtype": "bfloat16",
  "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": )" +
         (tie ? "true" : "false") + "\n}\n";
}

struct TinyTensor {
  std::vector<int64_t> shape;
  std::vector<uint16_t> bf16;  // deterministic values, distinct per tensor
};

// name -> tensor of the tiny model, in per-expert (hub) or fused (transformers 5) layout.
inline std::map<std::string, TinyTensor> tiny_tensors(const TinyShape& s = {}, bool fused = false,
                                                      bool with_lm_head = true) {
  std::map<std::string, TinyTensor> out;
  int seed = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    TinyTensor t{std::move(shape), std::vector<uint16_t>(static_cast<size_t>(n))};
    ++seed;
    for (int64_t i = 0; i < n; ++i)
      t.bf16[static_cast<size_t>(i)] = f32_to_bf16(static_cast<float>(seed) + 0.001f * static_cast<float>(i % 997));
    out[name] = std::move(t);
  };
  const int64_t H = s.hidden, D = s.head_dim;
  add("model.embed_tokens.weight", {s.vocab, H});
  add("model.norm.weight", {H});
  if (with_lm_head) add("lm_head.weight", {s.vocab, H});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H});
    add(p + "post_attention_layernorm.weight", {H});
    add(p + "self_attn.q_proj.weight", {s.heads * D, H});
    add(p + "self_attn.k_proj.weight", {s.kv_heads * D, H});
    add(p + "self_attn.v_proj.weight", {s.kv_heads * D, H});
    add(p + "self_attn.o_proj.weight", {H, s.heads * D});
    add(p + "self_attn.q_norm.weight", {D});
    add(p + "self_attn.k_norm.weight", {D});
    if (l == 1) {  // mlp_only_layers = [1]
      add(p + "mlp.gate_proj.weight", {s.inter, H});
      add(p + "mlp.up_proj.weight", {s.inter, H});
      add(p + "mlp.down_proj.weight", {H, s.inter});
      continue;
    }
    add(p + "mlp.gate.weight", {s.experts, H});
    if (fused) {
      add(p + "mlp.experts.gate_up_proj", {s.experts, 2 * s.moe_inter, H});
      add(p + "mlp.experts.down_proj", {s.experts, H, s.moe_inter});
    } else {
      for (int64_t e = 0; e < s.experts; ++e) {
        const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        add(q + "gate_proj.weight", {s.moe_inter, H});
        add(q + "up_proj.weight", {s.moe_inter, H});
        add(q + "down_proj.weight", {H, s.moe_inter});
      }
    }
  }
  return out;
}

// Writes `tensors` as model.safetensors, or as `shards` shards + model.safetensors.index.json.
inline void write_checkpoint(const std::string& dir, const std::map<std::string, TinyTensor>& tensors, int shards = 1) {
  if (shards <= 1) {
    SafetensorsWriter w;
    for (const auto& [name, t] : tensors) w.add(name, DType::BF16, t.shape, t.bf16.data());
    w.write((fs::path(dir) / "model.safetensors").string());
    return;
  }
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(shards));
  std::string index = "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {";
  int i = 0;
  for (const auto& [name, t] : tensors) {
    int s = i++ % shards;
    writers[static_cast<size_t>(s)].add(name, DType::BF16, t.shape, t.bf16.data());
    char file[64];
    std::snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, shards);
    index += (i > 1 ? ", \"" : "\"") + name + "\": \"" + file + "\"";
  }
  index += "}}";
  for (int s = 0; s < shards; ++s) {
    char file[64];
    std::snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, shards);
    writers[static_cast<size_t>(s)].write((fs::path(dir) / file).string());
  }
  write_text((fs::path(dir) / "model.safetensors.index.json").string(), index);
}

}  // namespace cpinfer::test
