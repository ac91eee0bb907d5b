// FP8 e4m3 and fine-grained FP8 checkpoints' format (core/dtype.h, loader/quant.h): the e4m3
// decoding and encoding against their definition (fp8_reference.h), quantize_fp8's per-block scales,
// quantization_config parsing, and the dequantization of a weight by its 128x128 block scales. The
// checkpoints and models built from them are tested in fp8_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "fixtures.h"
#include "fp8_reference.h"
#include "loader/config.h"
#include "loader/quant.h"
#include "loader/safetensors.h"

using namespace cpinfer;
using namespace cpinfer::test;
using json = nlohmann::json;

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

// The encoder is the nearest code with ties to the even one (torch's cast): every code, the
// midpoints between neighbours (the ties), points just around them, random values; saturation.
TEST(Fp8, EncodeRoundsToTheNearestCodeTiesToEven) {
  std::vector<float> xs;
  for (int c = 0; c < 0x7e; ++c) {
    const double lo = e4m3_by_definition(c), hi = e4m3_by_definition(c + 1), mid = (lo + hi) / 2;
    for (double x : {lo, mid, hi}) xs.push_back(static_cast<float>(x));
    xs.push_back(std::nextafter(static_cast<float>(mid), 0.0f));
    xs.push_back(std::nextafter(static_cast<float>(mid), 1000.0f));
  }
  std::mt19937 rng(3);
  for (int i = 0; i < 2000; ++i)
    xs.push_back(std::ldexp(std::uniform_real_distribution<float>(1, 2)(rng), int(rng() % 20) - 12));
  for (float x : xs)
    for (float v : {x, -x}) ASSERT_EQ(int(f32_to_fp8_e4m3(v)), int(e4m3_encode(v))) << v;
  EXPECT_EQ(f32_to_fp8_e4m3(1000.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(-460.0f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nanf("")) & 0x7f, 0x7f);
}

// quantize_fp8 (demo-model --fp8): each block's largest value becomes ±448 · its scale, every value
// is its nearest code · scale.
TEST(Fp8, QuantizeScalesEachBlockByItsMaximum) {
  const int64_t N = 300, K = 260, sk = 3;
  std::vector<float> w(static_cast<size_t>(N * K)), scale(9);
  std::mt19937 rng(5);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::normal_distribution<float>(0, 0.02f)(rng) * float(1 + i % 7);
  std::vector<uint8_t> q(w.size());
  quantize_fp8(w.data(), N, K, 128, 128, q.data(), scale.data());
  std::vector<float> amax(9, 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      float& m = amax[(n / 128) * sk + k / 128];
      m = std::max(m, std::fabs(w[n * K + k]));
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t b = (n / 128) * sk + k / 128;
      ASSERT_EQ(scale[b], amax[b] / 448.0f);
      ASSERT_EQ(q[n * K + k], e4m3_encode(w[n * K + k] / scale[b])) << n << "," << k;
      if (std::fabs(w[n * K + k]) == amax[b]) EXPECT_EQ(q[n * K + k] & 0x7f, 0x7e);
    }
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
