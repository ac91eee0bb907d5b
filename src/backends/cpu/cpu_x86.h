// x86 SIMD kernels of the CPU back-end, defined in cpu_x86.cpp with the instruction set of each in a
// target attribute (the build targets baseline x86-64): cpu_linear.cpp calls them after asking
// have_avx2_fma() / have_avx512(). Internal to src/backends/cpu/.
#pragma once
#include <cstdint>

#include "ops/backend.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPINFER_X86_DISPATCH 1
#include <immintrin.h>

namespace cpinfer::cpu {

bool have_avx2_fma();  // AVX2, FMA and F16C
bool have_avx512();    // AVX-512 F, BW, DQ and VL

// out[m, n] = a[m] · w[n] for m < M <= 4 rows (decode) and n in [n0, n1) on AVX2 + FMA, w in F32,
// BF16, F16 or FP8 (block scales) converted 8 values at a time in registers; four independent
// 8-wide accumulators per row of a. Its sums are ordered differently from the generic path (and
// fused): results agree to rounding, and for a given machine they do not depend on the thread count.
void few_rows_avx2(const float* a, int64_t M, int64_t K, const Weight& w, int64_t n0, int64_t n1, float* out,
                   int64_t ldc);

// One FP8 weight row dequantized: out[k] = fp32(codes[k]) · scales[k / kFp8Block], rounded once,
// bit-identical to the generic path.
__attribute__((target("avx2,fma,f16c"))) void dequantize_fp8_row_avx2(const uint8_t* codes, const float* scales,
                                                                      int64_t K, float* out);

// The 16 BF16 values of h as fp32 (exact: a 16-bit shift): the weight tiles, the widening below and
// the attention's key transpose.
__attribute__((target("avx512f"))) inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// dst[i] = the fp32 value of BF16 src[i], 16 / 8 at a time.
__attribute__((target("avx512f"))) void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n);
__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint16_t* src, float* dst, int64_t n);

// out[m, n] = a[m] · w[n] for m < M, n in [n0, n1): BF16 or FP8 (block scales) weight rows w [., K]
// widened in registers (cpu_x86.cpp says how); a [M, K] fp32; out with row stride ldc. FP8 weights
// are fp32(code) · scale rounded once, as everywhere; NaN codes give NaN.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemm_avx512(const float* a, int64_t M, int64_t K,
                                                                      const Weight& w, int64_t n0, int64_t n1,
                                                                      float* out, int64_t ldc);

}  // namespace cpinfer::cpu

#endif
