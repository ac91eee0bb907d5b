#include "model/random_weights.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

namespace cpinfer {

namespace {

constexpr const char* kQwen3_30B_A3B = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": false,
  "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
  "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32,
  "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "vocab_size": 151936})";

// Device tensors filled from a few host pools of random bf16 values (one pool per scale), read at
// offsets drawn per tensor; fast enough for tens of GB. A tensor's values depend only on the seed
// and its id (layer, kind, expert), never on which other tensors this rank builds, so every world
// size and rank sees the same model.
class Filler {
 public:
  Filler(Backend& be, ModelWeights& w, uint64_t seed) : be_(be), w_(w), seed_(seed) {}
  Tensor make(uint64_t id, std::initializer_list<int64_t> dims, float scale, float mean = 0.0f) {
    rng_.seed(seed_ * 0x9E3779B97F4A7C15ull + id * 0xBF58476D1CE4E5B9ull + 1);
    Tensor probe(nullptr, DType::BF16, dims, be_.device());
    Buffer buf(be_, probe.nbytes());
    const std::vector<uint16_t>& pool = get_pool(scale, mean);
    const size_t n = static_cast<size_t>(probe.numel());
    size_t done = 0;
    while (done < n) {
      size_t off = std::uniform_int_distribution<size_t>(0, pool.size() / 2)(rng_);
      size_t len = std::min(n - done, pool.size() - off);
      be_.upload(static_cast<uint16_t*>(buf.data()) + done, pool.data() + off, len * 2);
      done += len;
    }
    Tensor t = buf.tensor(DType::BF16, dims);
    w_.bytes += t.nbytes();
    w_.owned.push_back(std::move(buf));
    return t;
  }

 private:
  const std::vector<uint16_t>& get_pool(float scale, float mean) {
    auto key = std::make_pair(scale, mean);
    auto it = pools_.find(key);
    if (it != pools_.end()) return it->second;
    std::vector<uint16_t> pool(size_t(1) << 22);
    std::normal_distribution<float> d(mean, scale);
    std::mt19937_64 pool_rng(seed_ * 7919 + static_cast<uint64_t>(scale * 1e6f) * 31 +
                             static_cast<uint64_t>(mean * 1e3f));
    for (auto& x : pool) x = f32_to_bf16(d(pool_rng));
    return pools_.emplace(key, std::move(pool)).first->second;
  }
  Backend& be_;
  ModelWeights& w_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::map<std::pair<float, float>, std::vector<uint16_t>> pools_;
};

}  // namespace

ModelConfig random_model_config(const std::string& name_or_path) {
  if (name_or_path == "qwen3-30b-a3b") return parse_config(kQwen3_30B_A3B, "built-in qwen3-30b-a3b");
  namespace fs = std::filesystem;
  fs::path p(name_or_path);
  if (fs::is_directory(p)) return load_config(p.string());
  CPI_CHECK(fs::is_regular_file(p), "--random-weights: '", name_or_path,
            "' is neither a built-in name (qwen3-30b-a3b) nor a config.json file or model directory");
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), p.string());
}

ModelWeights random_weights(const ModelConfig& cfg, Backend& be, int rank, int world, uint64_t seed) {
  ModelWeights w;
  Filler f(be, w, seed);
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size, Hq = cfg.num_attention_heads,
                Hkv = cfg.num_key_value_heads, D = cfg.head_dim, E = cfg.num_experts,
                I = cfg.moe_intermediate_size, Id = cfg.intermediate_size;
  const float s_h = 1.0f / std::sqrt(float(H));
  // Tensor ids: 1..3 global, then per layer 100 + 16 * layer + kind, experts 1e6 + (layer * E + e) * 3.
  w.embed = f.make(1, {V, H}, 1.0f);
  w.final_norm = f.make(2, {H}, 0.05f, 1.0f);
  w.lm_head = cfg.tie_word_embeddings ? w.embed : f.make(3, {V, H}, s_h);
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    LayerWeights L;
    const uint64_t lid = 100 + 16 * uint64_t(l);
    L.input_norm = f.make(lid + 0, {H}, 0.05f, 1.0f);
    L.post_attn_norm = f.make(lid + 1, {H}, 0.05f, 1.0f);
    L.q_proj = f.make(lid + 2, {Hq * D, H}, s_h);
    L.k_proj = f.make(lid + 3, {Hkv * D, H}, s_h);
    L.v_proj = f.make(lid + 4, {Hkv * D, H}, s_h);
    L.o_proj = f.make(lid + 5, {H, Hq * D}, 1.0f / std::sqrt(float(Hq * D)));
    L.q_norm = f.make(lid + 6, {D}, 0.05f, 1.0f);
    L.k_norm = f.make(lid + 7, {D}, 0.05f, 1.0f);
    L.moe = cfg.is_moe_layer(l);
    if (L.moe) {
      L.router = f.make(lid + 8, {E, H}, s_h);
      ExpertRange r = expert_range(static_cast<int>(E), rank, world);
      L.experts.n_experts = static_cast<int32_t>(E);
      L.experts.first = r.first;
      L.experts.count = r.count;
      for (int e = 0; e < r.count; ++e) {
        const uint64_t eid = 1000000 + (uint64_t(l) * E + r.first + e) * 3;
        L.experts.gate.push_back(f.make(eid, {I, H}, s_h));
        L.experts.up.push_back(f.make(eid + 1, {I, H}, s_h));
        L.experts.down.push_back(f.make(eid + 2, {H, I}, 1.0f / std::sqrt(float(I))));
      }
    } else {
      L.mlp_gate = f.make(lid + 9, {Id, H}, s_h);
      L.mlp_up = f.make(lid + 10, {Id, H}, s_h);
      L.mlp_down = f.make(lid + 11, {H, Id}, 1.0f / std::sqrt(float(Id)));
    }
    w.layers.push_back(std::move(L));
  }
  return w;
}

}  // namespace cpinfer
