// Fine-grained FP8 checkpoints (loader/quant.h): a checkpoint written by the published rule (per
// 128x128 block: scale = amax / 448, weight = e4m3(w / scale), weight_scale_inv = scale): on the
// CPU its weights stay FP8 and compute as their fp32 dequantized values (transformers' w.float() *
// scale_inv), 1 byte per weight; on a back-end without FP8 kernels they load as exactly their BF16
// dequantized values; bad FP8 checkpoints are refused. The e4m3 decoding, quantization_config
// parsing and the block dequantization are tested in fp8_format_test.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "engine/engine.h"
#include "engine/launch.h"
#include "fixtures.h"
#include "fp8_reference.h"
#include "loader/config.h"
#include "loader/quant.h"
#include "loader/safetensors.h"
#include "model/registry.h"
#include "model/weights.h"

using namespace cpinfer;
using namespace cpinfer::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::vector<float> read_f32(const TensorInfo& t) {
  std::vector<float> v(t.nbytes / dtype_size(t.dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t.dtype == DType::F32) {
      std::memcpy(&v[i], static_cast<const char*>(t.data) + i * 4, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(t.data) + i * 2, 2);
      v[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return v;
}

bool quantized_name(const std::string& n) { return n.size() > 12 && n.compare(n.size() - 12, 12, "_proj.weight") == 0; }

struct Written {
  int fp8_tensors = 0;
};

// Writes `out_fp8` (FP8 by the rule; F32 scales for attention, BF16 for the MLPs) and `out_ref`
// (the same model with every quantized weight replaced by fp8 · stored scale: fp32(product) as F32
// with ref_dtype F32, that rounded to BF16 with ref_dtype BF16) from checkpoint `src`.
Written write_pair(const std::string& src, const std::string& out_fp8, const std::string& out_ref,
                   DType ref_dtype = DType::BF16) {
  Checkpoint ck = Checkpoint::open(src);
  SafetensorsWriter fp8, ref;
  Written w;
  for (const std::string& name : ck.names()) {
    const TensorInfo& t = ck.get(name);
    if (!quantized_name(name) || t.shape.size() != 2) {
      fp8.add(name, t.dtype, t.shape, t.data);
      ref.add(name, t.dtype, t.shape, t.data);
      continue;
    }
    const int64_t N = t.shape[0], K = t.shape[1], bn = 128, sn = (N + bn - 1) / bn, sk = (K + bn - 1) / bn;
    const std::vector<float> x = read_f32(t);
    const bool bf16_scales = name.find("mlp") != std::string::npos;
    std::vector<float> scale(static_cast<size_t>(sn * sk));
    for (int64_t i = 0; i < sn; ++i)
      for (int64_t j = 0; j < sk; ++j) {
        float amax = 0;
        for (int64_t n = i * bn; n < std::min(N, (i + 1) * bn); ++n)
          for (int64_t k = j * bn; k < std::min(K, (j + 1) * bn); ++k) amax = std::max(amax, std::fabs(x[n * K + k]));
        float s = amax > 0 ? amax / 448.0f : 1.0f;
        if (bf16_scales) s = bf16_to_f32(f32_to_bf16(s));  // what the file will hold
        scale[i * sk + j] = s;
      }
    std::vector<uint8_t> q(x.size());
    std::vector<uint16_t> deq(x.size());
    std::vector<float> deq32(x.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const float s = scale[(n / bn) * sk + k / bn];
        q[n * K + k] = f32_to_fp8_e4m3(std::clamp(x[n * K + k] / s, -448.0f, 448.0f));  // = e4m3_encode
        deq32[n * K + k] = static_cast<float>(e4m3_by_definition(q[n * K + k])) * s;
        deq[n * K + k] = f32_to_bf16(deq32[n * K + k]);
      }
    fp8.add(name, DType::F8E4M3, t.shape, q.data());
    if (bf16_scales) {
      std::vector<uint16_t> sb(scale.size());
      for (size_t i = 0; i < scale.size(); ++i) sb[i] = f32_to_bf16(scale[i]);
      fp8.add(name + "_scale_inv", DType::BF16, {sn, sk}, sb.data());
    } else {
      fp8.add(name + "_scale_inv", DType::F32, {sn, sk}, scale.data());
    }
    if (ref_dtype == DType::F32)
      ref.add(name, DType::F32, t.shape, deq32.data());
    else
      ref.add(name, DType::BF16, t.shape, deq.data());
    ++w.fp8_tensors;
  }
  fs::create_directories(out_fp8);
  fs::create_directories(out_ref);
  fp8.write(out_fp8 + "/model.safetensors");
  ref.write(out_ref + "/model.safetensors");
  std::ifstream in(src + "/config.json");
  json cfg = json::parse(in);
  std::ofstream(out_ref + "/config.json") << cfg.dump(2);
  cfg["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"},
                                {"weight_block_size", {128, 128}},
                                {"modules_to_not_convert", {"lm_head", "gate"}}};
  std::ofstream(out_fp8 + "/config.json") << cfg.dump(2);
  return w;
}

// A random BF16 checkpoint of fixture `base`'s family with its config.json changed by `changes`
// (shapes off the 128x128 blocks): every tensor the family's weight map names, drawn as random
// weights are (model/random_weights.cpp).
void write_random_model(const std::string& base, const json& changes, const std::string& out) {
  std::ifstream in(fixture_dir(base) + "/config.json");
  json cfg = json::parse(in);
  cfg.merge_patch(changes);
  const ModelConfig c = parse_config(cfg.dump(), "config.json");
  ModelWeights sink;
  const WeightMap map = model_family(c.architecture).weight_map(c, sink, expert_range(c.num_experts, 0, 1), TpShard{});
  std::mt19937 rng(7);
  SafetensorsWriter wr;
  auto add = [&](const std::string& name, const std::vector<int64_t>& shape, float scale, float mean) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<uint16_t> v(static_cast<size_t>(n));
    std::normal_distribution<float> dist(mean, scale);
    for (uint16_t& x : v) x = f32_to_bf16(dist(rng));
    wr.add(name, DType::BF16, shape, v.data());
  };
  for (const WeightEntry& e : map.tensors) add(e.name, e.shape, e.random_scale, e.random_mean);
  for (const ExpertEntry& x : map.experts)
    for (int64_t e = 0; e < x.n_experts; ++e) {
      const std::string p = x.prefix + std::to_string(e) + ".";
      const float s_in = 1.0f / std::sqrt(float(x.hidden)), s_out = 1.0f / std::sqrt(float(x.width));
      add(p + "gate_proj.weight", {x.width, x.hidden}, s_in, 0.0f);
      add(p + "up_proj.weight", {x.width, x.hidden}, s_in, 0.0f);
      add(p + "down_proj.weight", {x.hidden, x.width}, s_out, 0.0f);
    }
  fs::create_directories(out);
  wr.write(out + "/model.safetensors");
  std::ofstream(out + "/config.json") << cfg.dump(2);
}

EngineOptions opts(const std::string& fp8 = "auto") {
  EngineOptions eo;
  eo.quiet = true;
  eo.kv_cache_tokens = 256;
  eo.backend.fp8 = fp8;
  return eo;
}

std::vector<float> all_logits(const std::string& dir, const std::vector<int32_t>& ids,
                              const std::string& fp8 = "auto") {
  Engine e(dir, opts(fp8));
  std::vector<int> seqs;
  std::vector<std::span<const int32_t>> prompts{std::span<const int32_t>(ids)};
  auto out = e.prefill(prompts, seqs, LogitsWanted::All);
  for (int s : seqs) e.release(s);
  return out.at(0);
}

// Parameterized by model (Fp8Models below); TEST_F tests use no parameter.
class Fp8Dir : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("cpinfer_fp8_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  fs::path root_;
};

}  // namespace

// On a back-end without FP8 kernels (the CUDA back-end; here the CPU one with --fp8-weights bf16)
// the FP8 checkpoint gives exactly the logits of its dequantized BF16 twin (the loader turns each
// FP8 weight into the same BF16 values), and not those of the unquantized model (the weights did
// change).
TEST_F(Fp8Dir, WithoutFp8KernelsTheCheckpointLoadsAsItsBf16DequantizedWeights) {
  const std::string src = fixture_dir("moe_v4_gqa");
  const std::string fp8 = (root_ / "fp8").string(), ref = (root_ / "ref").string();
  const Written w = write_pair(src, fp8, ref);
  ASSERT_GT(w.fp8_tensors, 10);
  int f8 = 0;
  for (const std::string& n : Checkpoint::open(fp8).names()) f8 += Checkpoint::open(fp8).get(n).dtype == DType::F8E4M3;
  EXPECT_EQ(f8, w.fp8_tensors);
  const std::vector<int32_t> ids = {3, 17, 99, 5, 250, 41, 7, 7, 130, 64, 2, 11, 19, 300, 1, 8, 9, 77, 23};
  const std::vector<float> a = all_logits(fp8, ids, "bf16"), b = all_logits(ref, ids), orig = all_logits(src, ids);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
      << "an FP8 checkpoint must load as its dequantized weights";
  EXPECT_NE(std::memcmp(a.data(), orig.data(), a.size() * sizeof(float)), 0);
  for (float x : a) ASSERT_TRUE(std::isfinite(x));
}

TEST_F(Fp8Dir, BadFp8CheckpointsAreRefusedWithTheReason) {
  const std::string src = fixture_dir("moe_v4_gqa");
  const std::string fp8 = (root_ / "fp8").string(), ref = (root_ / "ref").string();
  write_pair(src, fp8, ref);
  auto load_error = [&](const std::string& dir) -> std::string {
    try {
      Engine e(dir, opts());
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  // The same file without quantization_config.
  const std::string noq = (root_ / "noq").string();
  fs::create_directories(noq);
  fs::copy(fp8 + "/model.safetensors", noq + "/model.safetensors");
  fs::copy(ref + "/config.json", noq + "/config.json");
  EXPECT_NE(load_error(noq).find("F8_E4M3 needs an FP8 quantization_config"), std::string::npos) << load_error(noq);

  // A weight's scales missing, or of the wrong shape.
  Checkpoint ck = Checkpoint::open(fp8);
  const std::string victim = "model.layers.0.self_attn.q_proj.weight";
  ASSERT_NE(ck.find(victim + "_scale_inv"), nullptr);
  for (const bool drop : {true, false}) {
    const std::string dir = (root_ / (drop ? "noscale" : "badscale")).string();
    fs::create_directories(dir);
    SafetensorsWriter wr;
    for (const std::string& n : ck.names()) {
      const TensorInfo& t = ck.get(n);
      if (n == victim + "_scale_inv") {
        if (drop) continue;
        const std::vector<float> s(static_cast<size_t>(t.shape[0] * t.shape[1] + 1), 1.0f);
        wr.add(n, DType::F32, {t.shape[0], t.shape[1] + 1}, s.data());
        continue;
      }
      wr.add(n, t.dtype, t.shape, t.data);
    }
    wr.write(dir + "/model.safetensors");
    fs::copy(fp8 + "/config.json", dir + "/config.json");
    const std::string err = load_error(dir);
    EXPECT_NE(err.find(victim + "_scale_inv"), std::string::npos) << err;
    EXPECT_NE(err.find(drop ? "missing tensor" : "must have shape"), std::string::npos) << err;
  }

  // A norm stored as FP8: only 2-D linear weights may be.
  {
    const std::string dir = (root_ / "fp8norm").string();
    fs::create_directories(dir);
    SafetensorsWriter wr;
    const std::string norm = "model.layers.0.input_layernorm.weight";
    for (const std::string& n : ck.names()) {
      const TensorInfo& t = ck.get(n);
      if (n == norm) {
        const std::vector<uint8_t> q(static_cast<size_t>(t.shape[0]), 0x38);  // 1.0
        wr.add(n, DType::F8E4M3, t.shape, q.data());
        continue;
      }
      wr.add(n, t.dtype, t.shape, t.data);
    }
    wr.write(dir + "/model.safetensors");
    fs::copy(fp8 + "/config.json", dir + "/config.json");
    EXPECT_NE(load_error(dir).find("only 2-D linear weights may be FP8"), std::string::npos) << load_error(dir);
  }
}

namespace {

// Two models with every FP8 weight spanning several 128x128 blocks, ragged at the ends: a MoE one
// with a dense MLP layer (mlp_only_layers) and a dense one.
void write_model(const std::string& kind, const std::string& out) {
  if (kind == "moe")
    write_random_model("moe_v4_gqa",
                       {{"hidden_size", 136},
                        {"num_attention_heads", 5},
                        {"num_key_value_heads", 1},
                        {"moe_intermediate_size", 200},
                        {"intermediate_size", 260},
                        {"num_hidden_layers", 2},
                        {"mlp_only_layers", {1}}},
                       out);
  else
    write_random_model(
        "dense_qwen3",
        {{"hidden_size", 136}, {"num_attention_heads", 5}, {"num_key_value_heads", 1}, {"intermediate_size", 260}},
        out);
}

const std::vector<int32_t> kPrompt = {3, 17, 99, 5, 250, 41, 7, 7, 130, 64, 2, 11, 19, 300, 1, 8, 9, 77, 23};

// Prefill of one prompt on `cp` local ranks (experts sharded over them): all logits of rank 0's
// view and a greedy continuation.
std::pair<std::vector<float>, std::vector<int32_t>> prefill_and_greedy(const std::string& dir, int cp) {
  std::pair<std::vector<float>, std::vector<int32_t>> out;
  LaunchOptions lo;
  lo.cp_size = cp;
  lo.timeout_s = 120;
  launch(lo, [&](ParallelCtx& par) {
    EngineOptions eo = opts();
    eo.cp = CpOptions{cp, true, 0};
    Engine e(dir, eo, par);
    std::vector<int> seqs;
    std::vector<std::span<const int32_t>> prompts{std::span<const int32_t>(kPrompt)};
    auto logits = e.prefill(prompts, seqs, LogitsWanted::All);
    for (int s : seqs) e.release(s);
    GenerateOptions g;
    g.max_new_tokens = 8;
    g.ignore_eos = true;
    g.sampling.temperature = 0;
    auto tokens = e.generate(kPrompt, g).output_ids;
    if (par.world_rank() == 0) out = {logits.at(0), tokens};
  });
  return out;
}

using Fp8Models = Fp8Dir;
INSTANTIATE_TEST_SUITE_P(Models, Fp8Models, ::testing::Values("moe", "dense"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace

// On the CPU the FP8 weights stay FP8 and compute as their fp32 dequantized values: the logits of a
// prompt (prefill: dequantized blocks + sgemm; the experts' few rows and a 3-token prompt: the
// row-by-row kernels) equal those of the twin with F32 weights fp32(e4m3 · scale) to ~1e-5, and
// are ~100x further from the BF16-rounded twin's (the BF16 dequantization this replaces).
TEST_P(Fp8Models, OnTheCpuWeightsComputeAsTheirFp32DequantizedValues) {
  const std::string src = (root_ / "src").string(), fp8 = (root_ / "fp8").string();
  const std::string ref32 = (root_ / "ref32").string(), ref16 = (root_ / "ref16").string();
  write_model(GetParam(), src);
  ASSERT_GT(write_pair(src, fp8, ref32, DType::F32).fp8_tensors, 6);
  write_pair(src, (root_ / "fp8b").string(), ref16, DType::BF16);
  for (const std::vector<int32_t>& ids : {kPrompt, std::vector<int32_t>{5, 250, 41}}) {
    const std::vector<float> a = all_logits(fp8, ids), b = all_logits(ref32, ids), c = all_logits(ref16, ids);
    ASSERT_EQ(a.size(), b.size());
    const double err = rel_max_err(a.data(), b.data(), a.size()), bf16_err = rel_max_err(a.data(), c.data(), a.size());
    std::printf("[fp8 %s, %zu tokens] FP8 vs fp32-dequantized twin %.3g, vs BF16-dequantized twin %.3g\n",
                GetParam().c_str(), ids.size(), err, bf16_err);
    EXPECT_LE(err, 1e-5) << "FP8 weights must compute as their fp32 dequantized values";
    EXPECT_GT(bf16_err, 1e-4) << "the BF16 twin should differ: the test would not see BF16 rounding";
  }
}

// Context parallelism with the experts sharded over two ranks equals one rank on the FP8 model.
TEST_P(Fp8Models, ContextParallelTwoRanksEqualsOne) {
  const std::string src = (root_ / "src").string(), fp8 = (root_ / "fp8").string();
  write_model(GetParam(), src);
  write_pair(src, fp8, (root_ / "ref").string());
  const auto one = prefill_and_greedy(fp8, 1), two = prefill_and_greedy(fp8, 2);
  ASSERT_EQ(one.first.size(), two.first.size());
  EXPECT_LE(rel_max_err(two.first.data(), one.first.data(), one.first.size()), 1e-5);
  EXPECT_EQ(one.second, two.second);
}

// Loaded on the CPU, each FP8 weight is a view of its codes in the checkpoint (1 byte per weight)
// plus F32 scales; ModelWeights::bytes counts exactly that. Without FP8 kernels they are BF16. Rank 1
// of 2 holds the codes of its own experts only.
TEST_F(Fp8Dir, OnTheCpuFp8WeightsTakeOneBytePerWeightAndShardByExpert) {
  const std::string src = (root_ / "src").string(), fp8 = (root_ / "fp8").string();
  write_model("moe", src);
  write_pair(src, fp8, (root_ / "ref").string());
  const Checkpoint ck = Checkpoint::open(fp8);
  const ModelConfig cfg = load_config(fp8);
  size_t want_bytes = 0, fp8_elems = 0, scale_elems = 0;
  for (const std::string& n : ck.names()) {
    const TensorInfo& t = ck.get(n);
    const bool scale = n.size() > 10 && n.compare(n.size() - 10, 10, "_scale_inv") == 0;
    want_bytes += scale ? t.nbytes / dtype_size(t.dtype) * 4 : t.nbytes;
    if (t.dtype == DType::F8E4M3) fp8_elems += t.nbytes;
    if (scale) scale_elems += t.nbytes / dtype_size(t.dtype);
  }
  ASSERT_GT(fp8_elems, 0u);
  auto cpu = make_cpu_backend();
  const ModelWeights w = load_weights(ck, cfg, *cpu, 0, 1);
  EXPECT_EQ(w.bytes, want_bytes);
  EXPECT_LE(double(fp8_elems + 4 * scale_elems) / double(fp8_elems), 1.01) << "~1 byte per FP8 weight";
  size_t seen = 0;
  auto check = [&](const Weight& x, const std::string& name) {
    const TensorInfo& t = ck.get(name);
    EXPECT_EQ(x.dtype, DType::F8E4M3) << name;
    EXPECT_EQ(x.data, t.data) << name << ": the codes are a view of the checkpoint";
    EXPECT_EQ(x.nbytes(), size_t(x.numel())) << name;
    ASSERT_EQ(x.scale.dtype, DType::F32) << name;
    EXPECT_EQ(x.scale.numel(),
              int64_t(ck.get(name + "_scale_inv").nbytes / dtype_size(ck.get(name + "_scale_inv").dtype)));
    seen += t.nbytes;
  };
  for_each_linear_weight(w, check);
  EXPECT_EQ(seen, fp8_elems) << "every FP8 weight of the checkpoint stays FP8";

  // Without FP8 kernels: BF16, 2 bytes per weight, no scales.
  auto bf16 = make_cpu_backend(/*simd=*/true, /*fp8=*/false);
  const ModelWeights wb = load_weights(ck, cfg, *bf16, 0, 1);
  EXPECT_EQ(wb.bytes, want_bytes + fp8_elems - 4 * scale_elems);
  EXPECT_EQ(wb.layers[0].q_proj.weight.dtype, DType::BF16);
  EXPECT_FALSE(wb.layers[0].q_proj.weight.scale.defined());

  // Rank 1 of 2: experts [4, 8), each a view of its own codes with its own scales.
  const ModelWeights w1 = load_weights(ck, cfg, *cpu, 1, 2);
  const ExpertShard& S = w1.layers[0].experts;
  ASSERT_EQ(S.first, 4);
  ASSERT_EQ(S.count, 4);
  for (int32_t k = 0; k < S.count; ++k) {
    const std::string name = "model.layers.0.mlp.experts." + std::to_string(S.first + k) + ".up_proj.weight";
    EXPECT_EQ(S.up[k].data, ck.get(name).data) << name;
    const std::vector<float> s = fp8_scales_f32(ck.get(name), ck.get(name + "_scale_inv"), cfg.quant);
    ASSERT_EQ(S.up[k].scale.numel(), int64_t(s.size()));
    EXPECT_EQ(std::memcmp(S.up[k].scale.data, s.data(), s.size() * 4), 0) << name;
  }
  EXPECT_LT(w1.bytes, w.bytes);
}
