#include "model/random_weights.h"

#include "model/registry.h"
#include "model/weight_map.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

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

// The same shape as Qwen/Qwen3-30B-A3B-FP8 publishes it: the linear layers (attention projections
// and experts) fine-grained FP8 with 128x128 block scales; norms, embeddings, router and LM head BF16.
constexpr const char* kFp8Quantization =
    R"({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"]})";

// Device tensors filled from a few host pools of random bf16 values (one pool per scale), read at
// offsets drawn per tensor; fast enough for tens of GB. A tensor's values depend only on the seed
// and its id (layer, kind, expert), never on which other tensors this rank builds, so every world
// size and rank sees the same model.
class Filler {
 public:
  Filler(Backend& be, ModelWeights& w, uint64_t seed) : be_(be), w_(w), seed_(seed) {}
  // With a `shard` (attention TP) the full tensor is drawn on the host exactly as without one and
  // the rank's slice of it is uploaded, so every TP size sees the same model.
  Tensor make(uint64_t id, const std::vector<int64_t>& dims, float scale, float mean = 0.0f,
              const LinearShard& shard = {}) {
    rng_.seed(seed_ * 0x9E3779B97F4A7C15ull + id * 0xBF58476D1CE4E5B9ull + 1);
    Tensor probe(nullptr, DType::BF16, {}, be_.device());
    const std::vector<int64_t> local = shard.local_shape(dims);
    for (int64_t d : local) probe.shape[size_t(probe.ndim++)] = d;
    Buffer buf(be_, probe.nbytes());
    const std::vector<uint16_t>& pool = get_pool(scale, mean);
    size_t n = 1;
    for (int64_t d : dims) n *= size_t(d);
    std::vector<uint16_t> full(shard.split == LinearShard::Split::None ? 0 : n);
    size_t done = 0;
    while (done < n) {
      size_t off = std::uniform_int_distribution<size_t>(0, pool.size() / 2)(rng_);
      size_t len = std::min(n - done, pool.size() - off);
      if (full.empty())
        be_.upload(static_cast<uint16_t*>(buf.data()) + done, pool.data() + off, len * 2);
      else
        std::copy_n(pool.data() + off, len, full.data() + done);
      done += len;
    }
    if (!full.empty()) {
      std::vector<uint8_t> copy;
      be_.upload(buf.data(), slice_host(shard, full.data(), dims[0], dims[1], 2, copy), probe.nbytes());
      be_.sync();  // `full` and `copy` are freed on return
    }
    Tensor t = probe;
    t.data = buf.data();
    w_.bytes += t.nbytes();
    w_.owned.push_back(std::move(buf));
    return t;
  }

  // An FP8 linear weight [N, K] of the magnitude make() gives a BF16 one with `scale` (N(0,
  // scale²) values): codes drawn from e4m3(N(0, kCodeSigma²)) (finite: |code value| <= 448, never
  // the NaN code), one scale per 128x128 block of scale / kCodeSigma · U(0.75, 1.25) (real blocks'
  // scales vary with their maxima). keep_fp8: codes + F32 scales on the device; otherwise the
  // product code · scale rounded to BF16 (what the loader gives a back-end without FP8 kernels).
  // With a `shard`: the rank's slice of that weight (its codes and block scales, or their products).
  Weight make_fp8(uint64_t id, int64_t n, int64_t k, float scale, bool keep_fp8, const LinearShard& shard = {},
                  const std::string& name = {}) {
    rng_.seed(seed_ * 0x9E3779B97F4A7C15ull + id * 0xBF58476D1CE4E5B9ull + 1);
    const int64_t sn = (n + kFp8Block - 1) / kFp8Block, sk = (k + kFp8Block - 1) / kFp8Block;
    std::vector<float> scales(static_cast<size_t>(sn * sk));
    std::uniform_real_distribution<float> jitter(0.75f, 1.25f);
    for (float& x : scales) x = scale / kCodeSigma * jitter(rng_);
    const std::vector<uint8_t>& pool = code_pool();
    const size_t total = static_cast<size_t>(n * k);
    Weight w;
    if (keep_fp8 && shard.split == LinearShard::Split::None) {  // whole: codes straight from the pool
      Buffer codes(be_, total), sbuf(be_, scales.size() * sizeof(float));
      for (size_t done = 0; done < total;) {
        const size_t off = std::uniform_int_distribution<size_t>(0, pool.size() / 2)(rng_);
        const size_t len = std::min(total - done, pool.size() - off);
        be_.upload(static_cast<uint8_t*>(codes.data()) + done, pool.data() + off, len);
        done += len;
      }
      if (!scales.empty()) be_.upload(sbuf.data(), scales.data(), scales.size() * sizeof(float));
      be_.sync();  // `scales` is freed on return
      w = Weight(Tensor(codes.data(), DType::F8E4M3, {n, k}, be_.device()));
      w.scale = Tensor(sbuf.data(), DType::F32, {sn, sk}, be_.device());
      w_.bytes += total + scales.size() * sizeof(float);
      w_.owned.push_back(std::move(codes));
      w_.owned.push_back(std::move(sbuf));
      return w;
    }
    // The same codes drawn into host memory, then the slice taken (or dequantized).
    std::vector<uint8_t> codes(total);
    for (size_t done = 0; done < total;) {
      const size_t off = std::uniform_int_distribution<size_t>(0, pool.size() / 2)(rng_);
      const size_t len = std::min(total - done, pool.size() - off);
      std::copy_n(pool.data() + off, len, codes.data() + done);
      done += len;
    }
    const std::vector<int64_t> local = shard.local_shape({n, k});
    const int64_t ln = local[0], lk = local[1];
    const size_t local_total = static_cast<size_t>(ln * lk);
    const bool rows = shard.split == LinearShard::Split::Rows, cols = shard.split == LinearShard::Split::Cols;
    const int64_t r0 = rows ? shard.first : 0, c0 = cols ? shard.first : 0;
    if (keep_fp8) {
      const std::vector<float> local_scales = slice_fp8_scales(shard, scales, n, k, name);
      std::vector<uint8_t> copy;
      Buffer cbuf(be_, local_total), sbuf(be_, local_scales.size() * sizeof(float));
      if (local_total) be_.upload(cbuf.data(), slice_host(shard, codes.data(), n, k, 1, copy), local_total);
      if (!local_scales.empty()) be_.upload(sbuf.data(), local_scales.data(), local_scales.size() * sizeof(float));
      be_.sync();  // the host copies are freed on return
      w = Weight(Tensor(cbuf.data(), DType::F8E4M3, {ln, lk}, be_.device()));
      w.scale = Tensor(sbuf.data(), DType::F32, {(ln + kFp8Block - 1) / kFp8Block, (lk + kFp8Block - 1) / kFp8Block},
                       be_.device());
      w_.bytes += local_total + local_scales.size() * sizeof(float);
      w_.owned.push_back(std::move(cbuf));
      w_.owned.push_back(std::move(sbuf));
      return w;
    }
    // Dequantized to BF16 (the same codes the FP8 form would hold), only the slice's elements.
    std::vector<uint16_t> vals(local_total);
    for (int64_t i = 0; i < ln; ++i) {
      const int64_t r = r0 + i;
      for (int64_t j = 0; j < lk; ++j) {
        const int64_t c = c0 + j;
        const float s = scales[static_cast<size_t>((r / kFp8Block) * sk + c / kFp8Block)];
        vals[static_cast<size_t>(i * lk + j)] = f32_to_bf16(fp8_e4m3_to_f32(codes[static_cast<size_t>(r * k + c)]) * s);
      }
    }
    Buffer buf(be_, local_total * 2);
    if (local_total) be_.upload(buf.data(), vals.data(), local_total * 2);
    be_.sync();
    w = Weight(Tensor(buf.data(), DType::BF16, {ln, lk}, be_.device()));
    w_.bytes += local_total * 2;
    w_.owned.push_back(std::move(buf));
    return w;
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
  static constexpr float kCodeSigma = 100.0f;  // ~ 448 / 4.5: a 128x128 Gaussian block's amax is ~4.5 sigma
  const std::vector<uint8_t>& code_pool() {
    if (codes_.empty()) {
      codes_.resize(size_t(1) << 22);
      std::normal_distribution<float> d(0.0f, kCodeSigma);
      std::mt19937_64 pool_rng(seed_ * 7919 + 448);
      for (auto& c : codes_) c = f32_to_fp8_e4m3(std::clamp(d(pool_rng), -448.0f, 448.0f));
    }
    return codes_;
  }
  Backend& be_;
  ModelWeights& w_;
  std::vector<uint8_t> codes_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::map<std::pair<float, float>, std::vector<uint16_t>> pools_;
};

}  // namespace

ModelConfig random_model_config(const std::string& name_or_path) {
  if (name_or_path == "qwen3-30b-a3b") return parse_config(kQwen3_30B_A3B, "built-in qwen3-30b-a3b");
  if (name_or_path == "qwen3-30b-a3b-fp8") {
    nlohmann::json j = nlohmann::json::parse(kQwen3_30B_A3B);
    j["quantization_config"] = nlohmann::json::parse(kFp8Quantization);
    return parse_config(j.dump(), "built-in qwen3-30b-a3b-fp8");
  }
  namespace fs = std::filesystem;
  fs::path p(name_or_path);
  if (fs::is_directory(p)) return load_config(p.string());
  CPI_CHECK(
      fs::is_regular_file(p), "--random-weights: '", name_or_path,
      "' is neither a built-in name (qwen3-30b-a3b, qwen3-30b-a3b-fp8) nor a config.json file or model directory");
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), p.string());
}

ModelWeights random_weights(const ModelConfig& cfg, Backend& be, int rank, int world, uint64_t seed, TpShard tp) {
  ModelWeights w;
  const WeightMap map =
      model_family(cfg.architecture).weight_map(cfg, w, expert_range(cfg.num_experts, rank, world), tp);
  Filler f(be, w, seed);
  // An FP8 config (qwen3-30b-a3b-fp8, or a config.json with a quantization_config) gives its linear
  // layers FP8 weights, kept as codes + scales where the back-end computes with them (as the
  // checkpoint loader decides) and their BF16 dequantized values elsewhere.
  const bool fp8 = cfg.quant.fp8;
  CPI_CHECK(!fp8 || (cfg.quant.block_n == kFp8Block && cfg.quant.block_k == kFp8Block),
            "random weights: FP8 takes 128x128 blocks, the config has ", cfg.quant.block_n, "x", cfg.quant.block_k);
  const bool keep_fp8 = fp8 && be.fp8_weights_supported();
  for (const WeightEntry& e : map.tensors) {
    if (fp8 && e.scale_dst != nullptr) {
      CPI_CHECK(e.shape.size() == 2, "random weights: linear weight '", e.name, "' is not 2-D");
      Weight wt = f.make_fp8(e.random_id, e.shape[0], e.shape[1], e.random_scale, keep_fp8, e.shard, e.name);
      *e.dst = wt;
      if (keep_fp8) *e.scale_dst = wt.scale;
      continue;
    }
    *e.dst = f.make(e.random_id, e.shape, e.random_scale, e.random_mean, e.shard);
  }
  for (const ExpertEntry& x : map.experts) {
    ExpertShard& S = *x.dst;
    const float s_in = 1.0f / std::sqrt(float(x.hidden)), s_out = 1.0f / std::sqrt(float(x.width));
    for (int e = 0; e < S.count; ++e) {
      const uint64_t id = x.random_id + uint64_t(S.first + e) * 3;
      if (fp8) {
        S.gate[size_t(e)] = f.make_fp8(id, x.width, x.hidden, s_in, keep_fp8);
        S.up[size_t(e)] = f.make_fp8(id + 1, x.width, x.hidden, s_in, keep_fp8);
        S.down[size_t(e)] = f.make_fp8(id + 2, x.hidden, x.width, s_out, keep_fp8);
        continue;
      }
      S.gate[size_t(e)] = f.make(id, {x.width, x.hidden}, s_in);
      S.up[size_t(e)] = f.make(id + 1, {x.width, x.hidden}, s_in);
      S.down[size_t(e)] = f.make(id + 2, {x.hidden, x.width}, s_out);
    }
  }
  if (map.tie_lm_head) w.lm_head = w.embed;
  return w;
}

}  // namespace cpinfer
