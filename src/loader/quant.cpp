#include "loader/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/check.h"
#include "core/json.h"
#include "loader/safetensors.h"

namespace cpinfer {

using json = nlohmann::json;

QuantConfig parse_quantization_config(const json& root, const std::string& label) {
  QuantConfig q;
  const auto it = root.find("quantization_config");
  if (it == root.end() || it->is_null()) return q;
  const json& c = *it;
  const std::string f = label + ": quantization_config";
  CPI_CHECK(c.is_object(), f, " must be an object, got ", json_brief(c));
  auto str = [&](const char* key, const char* dflt) -> std::string {
    const auto v = c.find(key);
    if (v == c.end() || v->is_null()) return dflt;
    CPI_CHECK(v->is_string(), f, ".", key, " must be a string, got ", json_brief(*v));
    return v->get<std::string>();
  };
  const std::string method = str("quant_method", "");
  CPI_CHECK(method == "fp8", f, ".quant_method '", method,
            "' is not supported (cpinfer loads BF16/F16/F32 checkpoints and fine-grained FP8: quant_method fp8)");
  const std::string fmt = str("fmt", "e4m3");
  CPI_CHECK(fmt == "e4m3", f, ".fmt '", fmt, "' is not supported (FP8 weights must be e4m3)");
  const std::string act = str("activation_scheme", "dynamic");
  CPI_CHECK(act == "dynamic", f, ".activation_scheme '", act,
            "' is not supported: static activation scales are not implemented (dynamic per-token scales are)");
  const auto bs = c.find("weight_block_size");
  CPI_CHECK(bs != c.end() && !bs->is_null(), f,
            ".weight_block_size is missing: per-tensor FP8 scales are not supported (block-wise [128, 128] are)");
  CPI_CHECK(bs->is_array() && bs->size() == 2 && (*bs)[0].is_number_integer() && (*bs)[1].is_number_integer(), f,
            ".weight_block_size must be two integers, got ", json_brief(*bs));
  q.block_n = (*bs)[0].get<int64_t>();
  q.block_k = (*bs)[1].get<int64_t>();
  CPI_CHECK(q.block_n == 128 && q.block_k == 128, f, ".weight_block_size [", q.block_n, ", ", q.block_k,
            "] is not supported (only [128, 128])");
  if (const auto m = c.find("modules_to_not_convert"); m != c.end() && !m->is_null()) {
    CPI_CHECK(m->is_array(), f, ".modules_to_not_convert must be a list of strings, got ", json_brief(*m));
    for (const json& x : *m) {
      CPI_CHECK(x.is_string(), f, ".modules_to_not_convert must hold strings, got ", json_brief(x));
      q.not_converted.push_back(x.get<std::string>());
    }
  }
  q.fp8 = true;
  return q;
}

std::vector<float> fp8_scales_f32(const TensorInfo& w, const TensorInfo& s, const QuantConfig& q) {
  CPI_CHECK(q.fp8 && q.block_n > 0 && q.block_k > 0, "tensor '", w.name,
            "' is FP8 but config.json has no FP8 quantization_config");
  CPI_CHECK(w.dtype == DType::F8E4M3 && w.shape.size() == 2, "tensor '", w.name, "' in ", w.file,
            " must be a 2-D F8_E4M3 weight to dequantize");
  const int64_t N = w.shape[0], K = w.shape[1];
  const int64_t sn = (N + q.block_n - 1) / q.block_n, sk = (K + q.block_k - 1) / q.block_k;
  CPI_CHECK(s.dtype == DType::F32 || s.dtype == DType::BF16, "tensor '", s.name, "' in ", s.file, " has dtype ",
            dtype_name(s.dtype), "; FP8 scales must be F32 or BF16");
  CPI_CHECK(s.shape.size() == 2 && s.shape[0] == sn && s.shape[1] == sk, "tensor '", s.name, "' in ", s.file,
            " must have shape [", sn, ", ", sk, "] (one scale per ", q.block_n, "x", q.block_k, " block of '", w.name,
            "' [", N, ", ", K, "])");
  std::vector<float> out(static_cast<size_t>(sn * sk));
  if (s.dtype == DType::F32) {
    std::memcpy(out.data(), s.data, out.size() * sizeof(float));  // (memcpy: the mmap may be unaligned)
    return out;
  }
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, static_cast<const char*>(s.data) + i * 2, 2);
    out[i] = bf16_to_f32(h);
  }
  return out;
}

void quantize_fp8(const float* w, int64_t N, int64_t K, int64_t bn, int64_t bk, uint8_t* codes, float* scale_inv) {
  CPI_CHECK(N >= 0 && K >= 0 && bn > 0 && bk > 0, "quantize_fp8: bad shape [", N, ", ", K, "] or block ", bn, "x", bk);
  const int64_t sk = (K + bk - 1) / bk;
  for (int64_t n0 = 0; n0 < N; n0 += bn)
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      const int64_t n1 = std::min(N, n0 + bn), k1 = std::min(K, k0 + bk);
      float amax = 0.0f;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
      const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
      scale_inv[(n0 / bn) * sk + k0 / bk] = scale;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) codes[n * K + k] = f32_to_fp8_e4m3(w[n * K + k] / scale);
    }
}

void dequantize_fp8_rows(const TensorInfo& w, const TensorInfo& s, const QuantConfig& q, int64_t row0, int64_t rows,
                         DType out_dtype, void* out) {
  const std::vector<float> scales = fp8_scales_f32(w, s, q);
  const int64_t N = w.shape[0], K = w.shape[1], sk = (K + q.block_k - 1) / q.block_k;
  CPI_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= N, "dequantize_fp8_rows: rows [", row0, ", ", row0 + rows,
            ") are outside '", w.name, "' [", N, ", ", K, "]");
  CPI_CHECK(out_dtype == DType::BF16 || out_dtype == DType::F32, "dequantize_fp8_rows: output must be BF16 or F32");
  const auto* src = static_cast<const uint8_t*>(w.data);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = row0 + r;
    const uint8_t* row = src + n * K;
    for (int64_t k0 = 0; k0 < K; k0 += q.block_k) {
      const float sc = scales[static_cast<size_t>((n / q.block_n) * sk + k0 / q.block_k)];
      const int64_t k1 = std::min(K, k0 + q.block_k);
      if (out_dtype == DType::F32) {
        float* o = static_cast<float*>(out) + r * K;
        for (int64_t k = k0; k < k1; ++k) o[k] = fp8_e4m3_to_f32(row[k]) * sc;
      } else {
        uint16_t* o = static_cast<uint16_t*>(out) + r * K;
        for (int64_t k = k0; k < k1; ++k) o[k] = f32_to_bf16(fp8_e4m3_to_f32(row[k]) * sc);
      }
    }
  }
}

}  // namespace cpinfer
