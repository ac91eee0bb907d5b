// Random FP8 weights (model/random_weights.cpp): the built-in qwen3-30b-a3b-fp8 preset is the
// qwen3-30b-a3b shape with Qwen3-30B-A3B-FP8's quantization_config, and an FP8 config gives the
// linear layers finite e4m3 codes with 128x128 block scales of the BF16 weights' magnitude, kept
// FP8 on a back-end that computes with them and their BF16-rounded values elsewhere; a model built
// from them runs on the CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "engine/engine.h"
#include "fixtures.h"
#include "loader/config.h"
#include "model/random_weights.h"

using namespace cpinfer;
using namespace cpinfer::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A small MoE with a dense MLP layer (moe_dense_mix_fused's family), shapes on and off the 128
// blocks, with Qwen3-30B-A3B-FP8's quantization_config.
json small_fp8_config() {
  std::ifstream in(fixture_dir("moe_dense_mix_fused") + "/config.json");
  json cfg = json::parse(in);
  cfg.merge_patch(json{{"hidden_size", 256},
                       {"head_dim", 64},
                       {"num_attention_heads", 4},
                       {"num_key_value_heads", 1},
                       {"moe_intermediate_size", 160},
                       {"intermediate_size", 320},
                       {"quantization_config",
                        {{"quant_method", "fp8"},
                         {"fmt", "e4m3"},
                         {"activation_scheme", "dynamic"},
                         {"weight_block_size", {128, 128}},
                         {"modules_to_not_convert", {"lm_head"}}}}});
  return cfg;
}

std::vector<float> host_values(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::F8E4M3) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = fp8_e4m3_to_f32(static_cast<const uint8_t*>(t.data)[i]);
  } else {
    to_f32(t.data, t.dtype, v.data(), v.size());
  }
  return v;
}

// The weights W = code · scale of an FP8 weight, fp32.
std::vector<float> dequantized(const Weight& w) {
  const int64_t n = w.dim(0), k = w.dim(1), sk = (k + 127) / 128;
  std::vector<float> v = host_values(w);
  const auto* s = static_cast<const float*>(w.scale.data);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) v[r * k + c] *= s[(r / 128) * sk + c / 128];
  return v;
}

// Checks an FP8 weight's form and magnitude (RMS within 25% of the BF16 weights' `scale`), and that
// the BF16 twin holds exactly its BF16-rounded values.
void expect_fp8_weight(const Weight& w, const Weight& twin, float scale, const std::string& what) {
  ASSERT_EQ(w.dtype, DType::F8E4M3) << what;
  ASSERT_TRUE(w.scale.defined()) << what;
  EXPECT_EQ(w.scale.dtype, DType::F32) << what;
  ASSERT_EQ(w.scale.ndim, 2) << what;
  EXPECT_EQ(w.scale.dim(0), (w.dim(0) + 127) / 128) << what;
  EXPECT_EQ(w.scale.dim(1), (w.dim(1) + 127) / 128) << what;
  const auto* codes = static_cast<const uint8_t*>(w.data);
  int64_t nan_codes = 0;
  for (int64_t i = 0; i < w.numel(); ++i) nan_codes += (codes[i] & 0x7f) == 0x7f;
  EXPECT_EQ(nan_codes, 0) << what << ": NaN codes";
  const std::vector<float> v = dequantized(w);
  double sq = 0;
  for (float x : v) sq += double(x) * x;
  const double rms = std::sqrt(sq / double(v.size()));
  EXPECT_GT(rms, 0.75 * scale) << what;
  EXPECT_LT(rms, 1.25 * scale) << what;
  ASSERT_EQ(twin.dtype, DType::BF16) << what;
  ASSERT_FALSE(twin.scale.defined()) << what;
  const std::vector<float> t = host_values(twin);
  ASSERT_EQ(t.size(), v.size()) << what;
  int64_t differ = 0;
  for (size_t i = 0; i < v.size(); ++i) differ += t[i] != bf16_to_f32(f32_to_bf16(v[i]));
  EXPECT_EQ(differ, 0) << what << ": the BF16 twin is not the rounded FP8 weight";
}

TEST(Fp8RandomWeights, BuiltInPresetIsTheQwen3ShapeWithFineGrainedFp8) {
  const ModelConfig bf16 = random_model_config("qwen3-30b-a3b");
  const ModelConfig fp8 = random_model_config("qwen3-30b-a3b-fp8");
  EXPECT_FALSE(bf16.quant.fp8);
  EXPECT_TRUE(fp8.quant.fp8);
  EXPECT_EQ(fp8.quant.block_n, 128);
  EXPECT_EQ(fp8.quant.block_k, 128);
  EXPECT_EQ(fp8.hidden_size, bf16.hidden_size);
  EXPECT_EQ(fp8.num_hidden_layers, bf16.num_hidden_layers);
  EXPECT_EQ(fp8.num_experts, bf16.num_experts);
  EXPECT_EQ(fp8.moe_intermediate_size, bf16.moe_intermediate_size);
  EXPECT_EQ(fp8.vocab_size, bf16.vocab_size);
  EXPECT_THROW(random_model_config("qwen3-30b-a3b-fp4"), Error);
}

TEST(Fp8RandomWeights, LinearLayersAreFiniteFp8WithBlockScalesAndTheRestStaysBf16) {
  const ModelConfig cfg = parse_config(small_fp8_config().dump(), "small fp8");
  auto fp8_be = make_cpu_backend(/*simd=*/true, /*fp8=*/true);
  auto bf16_be = make_cpu_backend(/*simd=*/true, /*fp8=*/false);
  const ModelWeights w = random_weights(cfg, *fp8_be, 0, 1, 5);
  const ModelWeights t = random_weights(cfg, *bf16_be, 0, 1, 5);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights &L = w.layers[l], &T = t.layers[l];
    const std::string p = "layer " + std::to_string(l) + " ";
    const float s_h = 1.0f / std::sqrt(float(cfg.hidden_size));
    expect_fp8_weight(L.q_proj.weight, T.q_proj.weight, s_h, p + "q_proj");
    expect_fp8_weight(L.k_proj.weight, T.k_proj.weight, s_h, p + "k_proj");
    expect_fp8_weight(L.v_proj.weight, T.v_proj.weight, s_h, p + "v_proj");
    expect_fp8_weight(L.o_proj.weight, T.o_proj.weight, 1.0f / std::sqrt(float(cfg.num_attention_heads * cfg.head_dim)),
                      p + "o_proj");
    EXPECT_EQ(L.input_norm.dtype, DType::BF16) << p;
    EXPECT_EQ(L.q_norm.dtype, DType::BF16) << p;
    if (L.moe) {
      EXPECT_EQ(L.router.dtype, DType::BF16) << p << "router";
      ASSERT_EQ(L.experts.count, cfg.num_experts);
      const float s_in = s_h, s_out = 1.0f / std::sqrt(float(cfg.moe_intermediate_size));
      for (int e = 0; e < L.experts.count; ++e) {
        const std::string x = p + "expert " + std::to_string(e) + " ";
        expect_fp8_weight(L.experts.gate[e], T.experts.gate[e], s_in, x + "gate");
        expect_fp8_weight(L.experts.up[e], T.experts.up[e], s_in, x + "up");
        expect_fp8_weight(L.experts.down[e], T.experts.down[e], s_out, x + "down");
      }
    } else {
      expect_fp8_weight(L.mlp_gate.weight, T.mlp_gate.weight, s_h, p + "mlp.gate_proj");
      expect_fp8_weight(L.mlp_down.weight, T.mlp_down.weight, 1.0f / std::sqrt(float(cfg.intermediate_size)),
                        p + "mlp.down_proj");
    }
  }
  int n_dense = 0;
  for (const LayerWeights& L : w.layers) n_dense += !L.moe;
  EXPECT_GT(n_dense, 0) << "the config has a dense MLP layer";
  EXPECT_EQ(w.embed.dtype, DType::BF16);
  EXPECT_EQ(w.lm_head.dtype, DType::BF16);
  // One byte per FP8 weight: the FP8 model is smaller than its BF16 twin.
  EXPECT_LT(w.bytes, t.bytes);
  // A different seed draws different codes.
  const ModelWeights other = random_weights(cfg, *fp8_be, 0, 1, 6);
  EXPECT_NE(host_values(other.layers[0].q_proj.weight), host_values(w.layers[0].q_proj.weight));
}

TEST(Fp8RandomWeights, ModelRunsOnTheCpuAndMatchesItsBf16Twin) {
  const fs::path dir = fs::temp_directory_path() / ("cpinfer_fp8_random_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << small_fp8_config().dump(2);
  auto logits = [&](const std::string& fp8) {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 256;
    eo.backend.fp8 = fp8;
    eo.random_weights = (dir / "config.json").string();
    Engine e("", eo);
    const std::vector<int32_t> ids = {3, 17, 5, 99, 42, 7, 1, 64};
    std::vector<int> seqs;
    auto out = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
    e.release(seqs[0]);
    return out.at(0);
  };
  const std::vector<float> a = logits("auto"), b = logits("bf16");
  fs::remove_all(dir);
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  double max_a = 0, max_d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << i;
    max_a = std::max(max_a, std::fabs(double(a[i])));
    max_d = std::max(max_d, std::fabs(double(a[i]) - b[i]));
  }
  std::printf("[fp8 random] logits max |x| %.3g, max |fp8 - bf16 twin| %.3g\n", max_a, max_d);
  EXPECT_GT(max_a, 0.0);
  // The twin's weights are the FP8 ones rounded to BF16 (relative 2^-9): the logits agree closely
  // but not exactly (the FP8 model is not the BF16 one read another way).
  EXPECT_LT(max_d, 0.05 * max_a);
  EXPECT_GT(max_d, 0.0);
}

}  // namespace
