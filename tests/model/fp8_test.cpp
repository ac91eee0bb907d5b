// Fine-grained FP8 checkpoints (loader/quant.h): the e4m3 decoding, quantization_config parsing,
// and a checkpoint written by the published rule (per 128x128 block: scale = amax / 448, weight =
// e4m3(w / scale), weight_scale_inv = scale) loading as exactly its dequantized weights.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "engine/engine.h"
#include "fixtures.h"
#include "loader/config.h"
#include "loader/quant.h"
#include "loader/safetensors.h"

using namespace cpinfer;
using namespace cpinfer::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// e4m3fn by its definition, independent of fp8_e4m3_to_f32's bit assembly.
double e4m3_by_definition(int code) {
  const int sign = code >> 7, exp = (code >> 3) & 15, mant = code & 7;
  if (exp == 15 && mant == 7) return std::nan("");
  const double mag = exp == 0 ? std::ldexp(mant / 8.0, -6) : std::ldexp(1.0 + mant / 8.0, exp - 7);
  return sign ? -mag : mag;
}

// Nearest e4m3 code to x (|x| <= 448), ties to the even code, as torch's cast rounds.
uint8_t e4m3_encode(float x) {
  const double a = std::fabs(static_cast<double>(x));
  int best = 0;
  for (int c = 1; c < 127; ++c) {
    const double d = std::fabs(e4m3_by_definition(c) - a), db = std::fabs(e4m3_by_definition(best) - a);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(x) && best != 0 ? 0x80 : 0));
}

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

bool quantized_name(const std::string& n) {
  return n.size() > 12 && n.compare(n.size() - 12, 12, "_proj.weight") == 0;
}

struct Written {
  int fp8_tensors = 0;
};

// Writes `out_fp8` (FP8 by the rule; F32 scales for attention, BF16 for the MLPs) and `out_ref`
// (the same model with every quantized weight replaced by fp8 · stored scale, rounded to BF16) from
// checkpoint `src`.
Written write_pair(const std::string& src, const std::string& out_fp8, const std::string& out_ref) {
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
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const float s = scale[(n / bn) * sk + k / bn];
        q[n * K + k] = e4m3_encode(std::clamp(x[n * K + k] / s, -448.0f, 448.0f));
        deq[n * K + k] = f32_to_bf16(static_cast<float>(e4m3_by_definition(q[n * K + k])) * s);
      }
    fp8.add(name, DType::F8E4M3, t.shape, q.data());
    if (bf16_scales) {
      std::vector<uint16_t> sb(scale.size());
      for (size_t i = 0; i < scale.size(); ++i) sb[i] = f32_to_bf16(scale[i]);
      fp8.add(name + "_scale_inv", DType::BF16, {sn, sk}, sb.data());
    } else {
      fp8.add(name + "_scale_inv", DType::F32, {sn, sk}, scale.data());
    }
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

EngineOptions opts() {
  EngineOptions eo;
  eo.quiet = true;
  eo.kv_cache_tokens = 256;
  return eo;
}

std::vector<float> all_logits(const std::string& dir, const std::vector<int32_t>& ids) {
  Engine e(dir, opts());
  std::vector<int> seqs;
  std::vector<std::span<const int32_t>> prompts{std::span<const int32_t>(ids)};
  auto out = e.prefill(prompts, seqs, LogitsWanted::All);
  for (int s : seqs) e.release(s);
  return out.at(0);
}

class Fp8Dir : public ::testing::Test {
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

TEST(Fp8, E4m3DecodesEveryCodeAsDefined) {
  for (int c = 0; c < 256; ++c) {
    const double want = e4m3_by_definition(c);
    const float got = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
    } else {
      EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code " << c;
    }
  }
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8, QuantizationConfigTakesFineGrainedFp8AndRefusesTheRest) {
  std::ifstream in(fixture_dir("moe_v4_gqa") + "/config.json");
  const json base = json::parse(in);
  auto with = [&](const json& q) {
    json c = base;
    c["quantization_config"] = q;
    return parse_config(c.dump(), "config.json");
  };
  const json good = {{"quant_method", "fp8"},
                     {"fmt", "e4m3"},
                     {"activation_scheme", "dynamic"},
                     {"weight_block_size", {128, 128}},
                     {"modules_to_not_convert", {"lm_head"}}};
  const ModelConfig c = with(good);
  EXPECT_TRUE(c.quant.fp8);
  EXPECT_EQ(c.quant.block_n, 128);
  EXPECT_EQ(c.quant.block_k, 128);
  EXPECT_EQ(c.quant.not_converted, std::vector<std::string>{"lm_head"});
  EXPECT_FALSE(parse_config(base.dump(), "config.json").quant.fp8);
  const std::pair<json, const char*> bad[] = {
      {{{"quant_method", "awq"}}, "quant_method 'awq'"},
      {{{"quant_method", "fp8"}, {"fmt", "e5m2"}, {"weight_block_size", {128, 128}}}, "fmt 'e5m2'"},
      {{{"quant_method", "fp8"}, {"activation_scheme", "static"}, {"weight_block_size", {128, 128}}},
       "static activation scales"},
      {{{"quant_method", "fp8"}}, "per-tensor FP8"},
      {{{"quant_method", "fp8"}, {"weight_block_size", {64, 64}}}, "[64, 64] is not supported"},
      {{{"quant_method", "fp8"}, {"weight_block_size", "128"}}, "two integers"},
      {{{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}, {"modules_to_not_convert", {1}}}, "strings"},
      {json::array({1}), "must be an object"},
  };
  for (const auto& [q, msg] : bad) {
    try {
      with(q);
      ADD_FAILURE() << "accepted " << q.dump();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("quantization_config"), std::string::npos) << e.what();
    }
  }
}

// Each 128x128 block of a weight takes its own scale: a weight of 3 x 3 blocks (ragged at the
// ends), rows from the middle, F32 and BF16 scales, F32 and BF16 output.
TEST(Fp8, DequantizeUsesEachBlocksScale) {
  const int64_t N = 300, K = 260, sn = 3, sk = 3;
  std::vector<uint8_t> codes(static_cast<size_t>(N * K));
  for (size_t i = 0; i < codes.size(); ++i) {
    codes[i] = static_cast<uint8_t>((i * 2654435761u) >> 24);
    if ((codes[i] & 0x7f) == 0x7f) codes[i] = 0x3c;  // no NaN codes
  }
  std::vector<float> sf(static_cast<size_t>(sn * sk));
  std::vector<uint16_t> sb(sf.size());
  for (int64_t i = 0; i < sn; ++i)
    for (int64_t j = 0; j < sk; ++j) {
      sf[i * sk + j] = std::ldexp(1.0f + 0.125f * static_cast<float>(i * sk + j), static_cast<int>(i - 2 * j));
      sb[i * sk + j] = f32_to_bf16(sf[i * sk + j]);
    }
  TensorInfo w{"w.weight", DType::F8E4M3, {N, K}, codes.data(), codes.size(), "mem"};
  TensorInfo s32{"w.weight_scale_inv", DType::F32, {sn, sk}, sf.data(), sf.size() * 4, "mem"};
  TensorInfo s16{"w.weight_scale_inv", DType::BF16, {sn, sk}, sb.data(), sb.size() * 2, "mem"};
  QuantConfig q;
  q.fp8 = true;
  q.block_n = q.block_k = 128;
  const int64_t row0 = 37, rows = 250;
  for (const TensorInfo* s : {&s32, &s16}) {
    std::vector<float> f32(static_cast<size_t>(rows * K));
    std::vector<uint16_t> b16(static_cast<size_t>(rows * K));
    dequantize_fp8_rows(w, *s, q, row0, rows, DType::F32, f32.data());
    dequantize_fp8_rows(w, *s, q, row0, rows, DType::BF16, b16.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = row0 + r, b = (n / 128) * sk + k / 128;
        const float scale = s == &s32 ? sf[b] : bf16_to_f32(sb[b]);
        const float want = static_cast<float>(e4m3_by_definition(codes[n * K + k])) * scale;
        ASSERT_EQ(f32[r * K + k], want) << n << "," << k;
        ASSERT_EQ(b16[r * K + k], f32_to_bf16(want)) << n << "," << k;
      }
  }
  // Scales of the wrong shape or dtype, rows outside the weight.
  TensorInfo s_bad = s32;
  s_bad.shape = {sn, sk - 1};
  std::vector<float> out(static_cast<size_t>(K));
  EXPECT_THROW(dequantize_fp8_rows(w, s_bad, q, 0, 1, DType::F32, out.data()), Error);
  TensorInfo s_i32 = s32;
  s_i32.dtype = DType::I32;
  EXPECT_THROW(dequantize_fp8_rows(w, s_i32, q, 0, 1, DType::F32, out.data()), Error);
  EXPECT_THROW(dequantize_fp8_rows(w, s32, q, N - 1, 2, DType::F32, out.data()), Error);
}

// The FP8 checkpoint gives exactly the logits of its dequantized BF16 twin (the loader turns each
// FP8 weight into the same BF16 values), and not those of the unquantized model (the weights did
// change).
TEST_F(Fp8Dir, CheckpointLoadsAsItsDequantizedWeights) {
  const std::string src = fixture_dir("moe_v4_gqa");
  const std::string fp8 = (root_ / "fp8").string(), ref = (root_ / "ref").string();
  const Written w = write_pair(src, fp8, ref);
  ASSERT_GT(w.fp8_tensors, 10);
  int f8 = 0;
  for (const std::string& n : Checkpoint::open(fp8).names()) f8 += Checkpoint::open(fp8).get(n).dtype == DType::F8E4M3;
  EXPECT_EQ(f8, w.fp8_tensors);
  const std::vector<int32_t> ids = {3, 17, 99, 5, 250, 41, 7, 7, 130, 64, 2, 11, 19, 300, 1, 8, 9, 77, 23};
  const std::vector<float> a = all_logits(fp8, ids), b = all_logits(ref, ids), orig = all_logits(src, ids);
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
