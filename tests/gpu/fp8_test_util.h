// Host-side FP8 references for the CUDA FP8 tests: weights quantized by the published rule
// (loader/quant.h quantize_fp8), and the activation quantizer the block-scaled CUDA paths apply
// (kernels/fp8.cu): per row and 128-column block s = amax / 448 (1 for an all-zero block), q =
// e4m3(x / s) nearest-even and saturating, value q · s. A reference that applies this rule to the
// activations computes what those paths compute up to fp32 summation order, so it allows a tight
// tolerance; the unquantized reference (the CPU back-end's FP8 op: exact dequantize-then-fp32)
// bounds the error the activation quantization itself adds (e4m3's 3 mantissa bits: a relative
// rounding error of at most 2^-4, RMS about 2.6% per element, nmse ~7e-4 per quantized operand).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "loader/quant.h"

namespace cpinfer::gputest {

struct Fp8Matrix {
  int64_t n = 0, k = 0;
  std::vector<uint8_t> codes;  // [n, k]
  std::vector<float> scales;   // [ceil(n/128), ceil(k/128)]
  // code · scale in fp32 (the CPU back-end's weight values).
  std::vector<float> dequantized() const {
    std::vector<float> v(codes.size());
    const int64_t sk = (k + 127) / 128;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c)
        v[r * k + c] = fp8_e4m3_to_f32(codes[r * k + c]) * scales[(r / 128) * sk + c / 128];
    return v;
  }
};

inline Fp8Matrix quantize_weight(const std::vector<float>& w, int64_t n, int64_t k) {
  Fp8Matrix m;
  m.n = n;
  m.k = k;
  m.codes.resize(static_cast<size_t>(n * k));
  m.scales.resize(static_cast<size_t>(((n + 127) / 128) * ((k + 127) / 128)));
  quantize_fp8(w.data(), n, k, 128, 128, m.codes.data(), m.scales.data());
  return m;
}

// The activation rows [rows, k] (k % 128 == 0) as the CUDA quantizer leaves them: q · s per block.
inline std::vector<float> quantize_activations(const std::vector<float>& x, int64_t rows, int64_t k) {
  std::vector<float> out(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < k; b += 128) {
      const float* p = x.data() + r * k + b;
      float amax = 0.0f;
      for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(p[i]));
      const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
      for (int i = 0; i < 128; ++i) out[r * k + b + i] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(p[i] / s)) * s;
    }
  return out;
}

inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

}  // namespace cpinfer::gputest
