// x86 SIMD kernels of the CPU back-end (cpu_x86.h): AVX2 + FMA and AVX-512, each function built for
// its instruction set with a target attribute (the build targets baseline x86-64) and chosen at run
// time by cpu_linear.cpp.
#include "backends/cpu/cpu_x86.h"

#ifdef CPINFER_X86_DISPATCH
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_common.h"

namespace cpinfer::cpu {

namespace {
// The few-rows product on AVX2 + FMA, chosen at run time (the build targets baseline x86-64): each
// weight row is converted 8 values at a time in registers and multiplied into the rows of `a`
// without an fp32 copy, with four independent 8-wide accumulators per row of a. Its sums are
// ordered differently from the generic path (and fused): results agree to rounding, and for a given
// machine they do not depend on the thread count.

// 8 FP8 weights k .. k + 7 of `codes`, each fp32(code) · scale, given scale256 = scale · 256. An
// e4m3 byte s.eeee.mmm moved into the f16 s.0eeee.mmm0000000 is the e4m3 value / 256 exactly, for
// subnormals too (f16's exponent bias is 8 more than e4m3's; VCVTPH2PS widens f16 subnormals
// exactly). Then h · (scale · 256) is the exact product code · scale rounded once, as
// fp32(code) · scale is. Two kinds of block take the per-element path instead (fp8_block_vectorizable):
// scales whose fold would overflow, and blocks holding a NaN code (s.1111.111, which this would read
// as 480): a NaN test per 8 codes here took ~30% of the kernel's time, one per block a few percent.
// (Variants that build the fp32 bits directly in 32-bit lanes, e4m3 · 2^-120 times scale · 2^120, 8
// or 16 codes at a time, ran at 0.65-0.9x of this one on the CI machine's Zen 3.)
__attribute__((target("avx2,fma,f16c"))) inline __m256 fp8x8(const uint8_t* codes, int64_t k, __m256 scale256) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k));
  const __m128i hi = _mm_unpacklo_epi8(_mm_setzero_si128(), b);  // code << 8 per 16-bit lane
  const __m128i h = _mm_and_si128(_mm_srai_epi16(hi, 1), _mm_set1_epi16(static_cast<short>(0xbfff)));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), scale256);
}

// Whether codes [0, n) of a block (n a multiple of 8) with this scale can go through fp8x8: no NaN
// code, and scale · 256 finite (|scale| < 2^120; larger scales or non-finite ones, which no real
// checkpoint has, go element by element).
__attribute__((target("avx2,fma,f16c"))) inline bool fp8_block_vectorizable(const uint8_t* codes, int64_t n,
                                                                            float scale) {
  if (!(std::fabs(scale) < 0x1p120f)) return false;
  const __m256i sign = _mm256_set1_epi8(static_cast<char>(0x80)), nan = _mm256_set1_epi8(static_cast<char>(0xff));
  __m256i any = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
    any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_or_si256(c, sign), nan));
  }
  bool has_nan = !_mm256_testz_si256(any, any);
  for (; i < n; ++i) has_nan |= (codes[i] & 0x7f) == 0x7f;
  return !has_nan;
}

template <DType DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_f32(const void* w, int64_t k, __m256 scale256) {
  if constexpr (DT == DType::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k)));
  } else if constexpr (DT == DType::F8E4M3) {
    return fp8x8(static_cast<const uint8_t*>(w), k, scale256);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  }
}

// Weight k of a row (the scalar tail of the AVX2 kernel); `scales` only for FP8.
template <DType DT>
float weight_at(const void* row, int64_t k, const float* scales) {
  if constexpr (DT == DType::F8E4M3) {
    return fp8_values()[static_cast<const uint8_t*>(row)[k]] * scales[k / kFp8Block];
  } else if constexpr (DT == DType::F32) {
    return static_cast<const float*>(row)[k];
  } else {
    const uint16_t h = static_cast<const uint16_t*>(row)[k];
    return DT == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
}

template <DType DT>
__attribute__((target("avx2,fma,f16c"))) void few_rows_avx2(const float* a, int64_t M, int64_t K, const Weight& w,
                                                            int64_t n0, int64_t n1, float* out, int64_t ldc) {
  constexpr bool kFp8 = DT == DType::F8E4M3;
  constexpr size_t es = dtype_size(DT);
  // The vector loop covers [0, Kv) in blocks of one scale (FP8) or one block (other dtypes); only
  // the last block can end off a multiple of 8, so the scalar tail [Kv, K) follows the reduction.
  const int64_t Kv = K - K % 8, block = kFp8 ? kFp8Block : std::max<int64_t>(Kv, 1);
  for (int64_t n = n0; n < n1; ++n) {
    const void* row = static_cast<const char*>(w.data) + static_cast<size_t>(n * K) * es;
    const float* scales = kFp8 ? fp8_scale_row(w, n) : nullptr;
    for (int64_t m = 0; m < M; ++m) {
      const float* x = a + m * K;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
             acc3 = _mm256_setzero_ps();
      float rest = 0.0f;  // FP8 blocks that go element by element (none in real checkpoints)
      for (int64_t k0 = 0; k0 < Kv; k0 += block) {
        const int64_t k1 = std::min(Kv, k0 + block);
        if (kFp8 && !fp8_block_vectorizable(static_cast<const uint8_t*>(row) + k0, k1 - k0, scales[k0 / kFp8Block])) {
          for (int64_t k = k0; k < k1; ++k) rest += x[k] * weight_at<DT>(row, k, scales);
          continue;
        }
        const __m256 s = _mm256_set1_ps(kFp8 ? scales[k0 / kFp8Block] * 256.0f : 1.0f);
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) {
          acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8_f32<DT>(row, k, s), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8_f32<DT>(row, k + 8, s), acc1);
          acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8_f32<DT>(row, k + 16, s), acc2);
          acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8_f32<DT>(row, k + 24, s), acc3);
        }
        for (; k < k1; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8_f32<DT>(row, k, s), acc0);
      }
      const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float sum = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1))) + rest;
      for (int64_t k = Kv; k < K; ++k) sum += x[k] * weight_at<DT>(row, k, scales);
      out[m * ldc + n] = sum;
    }
  }
}

}  // namespace

void few_rows_avx2(const float* a, int64_t M, int64_t K, const Weight& w, int64_t n0, int64_t n1, float* out,
                   int64_t ldc) {
  switch (w.dtype) {
    case DType::BF16:
      return few_rows_avx2<DType::BF16>(a, M, K, w, n0, n1, out, ldc);
    case DType::F16:
      return few_rows_avx2<DType::F16>(a, M, K, w, n0, n1, out, ldc);
    case DType::F8E4M3:
      return few_rows_avx2<DType::F8E4M3>(a, M, K, w, n0, n1, out, ldc);
    default:
      return few_rows_avx2<DType::F32>(a, M, K, w, n0, n1, out, ldc);
  }
}

__attribute__((target("avx2,fma,f16c"))) void dequantize_fp8_row_avx2(const uint8_t* codes, const float* scales,
                                                                      int64_t K, float* out) {
  const int64_t Kv = K - K % 8;
  for (int64_t k0 = 0; k0 < Kv; k0 += kFp8Block) {
    const int64_t k1 = std::min(Kv, k0 + kFp8Block);
    const float scale = scales[k0 / kFp8Block];
    if (!fp8_block_vectorizable(codes + k0, k1 - k0, scale)) {
      for (int64_t k = k0; k < k1; ++k) out[k] = fp8_values()[codes[k]] * scale;
      continue;
    }
    const __m256 s = _mm256_set1_ps(scale * 256.0f);
    for (int64_t k = k0; k < k1; k += 8) _mm256_storeu_ps(out + k, fp8x8(codes, k, s));
  }
  for (int64_t k = Kv; k < K; ++k) out[k] = fp8_values()[codes[k]] * scales[k / kFp8Block];
}

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized reports
// when they inline (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// BF16 -> fp32 is a 16-bit shift: 16 (AVX-512) or 8 (AVX2) weights per instruction, where the
// plain loop compiles to one at a time for the baseline x86-64 target (it was ~12% of a prefill).
__attribute__((target("avx512f"))) void bf16_to_f32_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// ---- BF16 weights on AVX-512: out[m, n] = a[m] · w[n] with the weight rows widened in registers
// (bf16 -> fp32 is exact), no fp32 copy of w and no packing, for any M. A tile is 4 rows of a by 4
// rows of w: per 16 k, 4 weight and 4 activation loads feed 16 FMAs into 16 accumulators, and each
// accumulator is summed across its lanes at the end (an element's order of sums depends on K
// only). The panel's rows of w are walked once per 4 rows of a (from L2; a panel of gemm_wt is 128
// weight rows), the 4 rows of a stay in L1. The last partial 16 of K is read with masked loads.
namespace {

constexpr int kTileM = 4, kTileN = 4;

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 bf16x16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Σ of the 16 lanes, as a fixed tree (halves, then quarters, ...).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float hsum16(__m512 v) {
  const __m256 h8 =
      _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

// One 16-wide step of a tile at column k (lanes off `mask` read as zeros).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void tile_step(const float* const (&ar)[kTileM],
                                                                           const uint16_t* const (&wr)[kTileN],
                                                                           int64_t k, __mmask16 mask,
                                                                           __m512 (&acc)[kTileM][kTileN]) {
  __m512 wv[kTileN];
  for (int j = 0; j < kTileN; ++j) wv[j] = bf16x16(wr[j] + k, mask);
  for (int i = 0; i < kTileM; ++i) {
    const __m512 av = _mm512_maskz_loadu_ps(mask, ar[i] + k);
    for (int j = 0; j < kTileN; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
  }
}

}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemm_bf16_avx512(const float* a, int64_t M, int64_t K,
                                                                           const uint16_t* w, int64_t n0, int64_t n1,
                                                                           float* out, int64_t ldc) {
  const int64_t Kv = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
    const float* ar[kTileM];
    for (int i = 0; i < kTileM; ++i) ar[i] = a + std::min(m0 + i, M - 1) * K;  // past M: repeat, not stored
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      const uint16_t* wr[kTileN];
      for (int j = 0; j < kTileN; ++j) wr[j] = w + std::min(nb + j, n1 - 1) * K;
      __m512 acc[kTileM][kTileN];
      for (int i = 0; i < kTileM; ++i)
        for (int j = 0; j < kTileN; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < Kv; k += 16) tile_step(ar, wr, k, 0xffff, acc);
      if (tail) tile_step(ar, wr, Kv, tail, acc);
      for (int i = 0; i < kTileM && m0 + i < M; ++i)
        for (int j = 0; j < kTileN && nb + j < n1; ++j) out[(m0 + i) * ldc + nb + j] = hsum16(acc[i][j]);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return yes;
}

bool have_avx2_fma() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}

}  // namespace cpinfer::cpu

#endif  // CPINFER_X86_DISPATCH
