#include "model/random_weights.h"

#include "model/registry.h"
#include "model/weight_map.h"

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
  Tensor make(uint64_t id, const std::vector<int64_t>& dims, float scale, float mean = 0.0f) {
    rng_.seed(seed_ * 0x9E3779B97F4A7C15ull + id * 0xBF58476D1CE4E5B9ull + 1);
    Tensor probe(nullptr, DType::BF16, {}, be_.device());
    for (int64_t d : dims) probe.shape[size_t(probe.ndim++)] = d;
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
    Tensor t = probe;
    t.data = buf.data();
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
  const WeightMap map = model_family(cfg.architecture).weight_map(cfg, w, expert_range(cfg.num_experts, rank, world));
  Filler f(be, w, seed);
  for (const WeightEntry& e : map.tensors) *e.dst = f.make(e.random_id, e.shape, e.random_scale, e.random_mean);
  for (const ExpertEntry& x : map.experts) {
    ExpertShard& S = *x.dst;
    const float s_in = 1.0f / std::sqrt(float(x.hidden)), s_out = 1.0f / std::sqrt(float(x.width));
    for (int e = 0; e < S.count; ++e) {
      const uint64_t id = x.random_id + uint64_t(S.first + e) * 3;
      S.gate[size_t(e)] = f.make(id, {x.width, x.hidden}, s_in);
      S.up[size_t(e)] = f.make(id + 1, {x.width, x.hidden}, s_in);
      S.down[size_t(e)] = f.make(id + 2, {x.hidden, x.width}, s_out);
    }
  }
  if (map.tie_lm_head) w.lm_head = w.embed;
  return w;
}

}  // namespace cpinfer
