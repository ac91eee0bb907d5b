// x86 SIMD kernels of the CPU back-end (cpu_x86.h): AVX2 + FMA and AVX-512, each function built for
// its instruction set with a target attribute (the build targets baseline x86-64) and chosen at run
// time by cpu_linear.cpp.
#include "backends/cpu/cpu_x86.h"

#ifdef CPINFER_X86_DISPATCH
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
    _mm512_storeu_ps(dst + i, bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
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

// ---- BF16 and FP8 weights on AVX-512: out[m, n] = a[m] · w[n] with the weight rows widened in
// registers, no fp32 copy of w and no packing, for any M. A tile is TM rows of a by 4 rows of w: per
// 16 k, 4 weight and TM activation loads feed 4·TM FMAs into as many accumulators, and each
// accumulator is summed across its lanes at the end (an element's order of sums depends on K only,
// not on M, the tile or the thread). The panel's rows of w are walked once per TM rows of a (from
// L2; a panel of gemm_wt is 128 weight rows), the rows of a stay in L1. The last partial 16 of K is
// read with masked loads. BF16 -> fp32 is a shift (exact). An FP8 code becomes its f16 image as in
// fp8x8 (value / 256, exact, subnormals too) and is multiplied by its block's scale · 256: the
// weight fp32(code) · scale rounded once, as transformers forms it; the K loop walks one scale block
// (kFp8Block) at a time. A tile whose weight rows hold a NaN code or a scale too large to fold (no
// real checkpoint has either) is computed again one weight at a time (fp8_tile_scalar).
namespace {

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 bf16x16(const uint16_t* p, __mmask16 m) {
  return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}

// 16 FP8 weights p[0, 16) (lanes off m read as code 0), times scale256 = block scale · 256.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 fp8x16(const uint8_t* p, __mmask16 m,
                                                                          __m512 scale256) {
  const __m256i hi = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p)), 8);  // code << 8
  const __m256i h = _mm256_and_si256(_mm256_srai_epi16(hi, 1), _mm256_set1_epi16(static_cast<short>(0xbfff)));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), scale256);
}

// Σ of the 16 lanes, as a fixed tree (halves, then quarters, ...).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float hsum16(__m512 v) {
  const __m256 h8 =
      _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

// One 16-wide step of a tile at column k (lanes off `mask` read as zeros); s: the FP8 rows' scales.
template <DType DT, int TM, int TN>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void tile_step(const float* const (&ar)[TM],
                                                                           const void* const (&wr)[TN], int64_t k,
                                                                           __mmask16 mask, const __m512 (&s)[TN],
                                                                           __m512 (&acc)[TM][TN]) {
  __m512 wv[TN];
  for (int j = 0; j < TN; ++j) {
    if constexpr (DT == DType::F8E4M3)
      wv[j] = fp8x16(static_cast<const uint8_t*>(wr[j]) + k, mask, s[j]);
    else
      wv[j] = bf16x16(static_cast<const uint16_t*>(wr[j]) + k, mask);
  }
  for (int i = 0; i < TM; ++i) {
    const __m512 av = _mm512_maskz_loadu_ps(mask, ar[i] + k);
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
  }
}

// The steps of columns [k, k1) (one FP8 scale block, or all of K), the last one masked if partial.
template <DType DT, int TM, int TN>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void tile_steps(const float* const (&ar)[TM],
                                                                            const void* const (&wr)[TN], int64_t k,
                                                                            int64_t k1, const __m512 (&s)[TN],
                                                                            __m512 (&acc)[TM][TN]) {
  for (; k + 16 <= k1; k += 16) tile_step<DT, TM, TN>(ar, wr, k, 0xffff, s, acc);
  if (k < k1) tile_step<DT, TM, TN>(ar, wr, k, static_cast<__mmask16>((1u << (k1 - k)) - 1u), s, acc);
}

// Of FP8 codes p[0, n) (n <= 64 are read): the running byte-wise max of code | 0x80, which is 0xff
// once a NaN code (s.1111.111) has been seen. One load, or and max per 64 codes, from L1 (the tile
// reads the same bytes): no pass of its own over the weights.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i fp8_nan_seen(__m512i seen, const uint8_t* p,
                                                                                 int64_t n) {
  const __mmask64 m = n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
  const __m512i c = _mm512_maskz_loadu_epi8(m, p);
  return _mm512_max_epu8(seen, _mm512_or_si512(c, _mm512_set1_epi8(static_cast<char>(0x80))));
}

// out[m, n] for rows [m0, m0 + rows) of a and [nb, nb + cols) of w, one weight at a time (FP8 tiles
// with a NaN code or a block scale of 2^120 or more, which fp8x16 cannot take; no real checkpoint has
// either): each weight fp32(code) · scale as everywhere, NaN codes giving NaN.
void fp8_tile_scalar(const float* a, int64_t m0, int64_t rows, int64_t K, const Weight& w, int64_t nb, int64_t cols,
                     float* out, int64_t ldc) {
  for (int64_t i = m0; i < m0 + rows; ++i)
    for (int64_t n = nb; n < nb + cols; ++n) {
      const uint8_t* c = static_cast<const uint8_t*>(w.data) + n * K;
      const float* sr = fp8_scale_row(w, n);
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += a[i * K + k] * weight_at<DType::F8E4M3>(c, k, sr);
      out[i * ldc + n] = sum;
    }
}

template <DType DT, int TM, int TN>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemm_tiles(const float* a, int64_t M, int64_t K,
                                                                     const Weight& w, int64_t n0, int64_t n1,
                                                                     float* out, int64_t ldc) {
  constexpr bool kFp8 = DT == DType::F8E4M3;
  const size_t es = dtype_size(DT);
  for (int64_t m0 = 0; m0 < M; m0 += TM) {
    const float* ar[TM];
    for (int i = 0; i < TM; ++i) ar[i] = a + std::min(m0 + i, M - 1) * K;  // past M: repeat, not stored
    for (int64_t nb = n0; nb < n1; nb += TN) {
      const void* wr[TN];
      const float* sr[TN] = {};
      for (int j = 0; j < TN; ++j) {
        const int64_t n = std::min(nb + j, n1 - 1);
        wr[j] = static_cast<const char*>(w.data) + static_cast<size_t>(n * K) * es;
        if constexpr (kFp8) sr[j] = fp8_scale_row(w, n);
      }
      __m512 acc[TM][TN];
      for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_setzero_ps();
      __m512 s[TN];
      for (int j = 0; j < TN; ++j) s[j] = _mm512_set1_ps(1.0f);
      __m512i seen = _mm512_setzero_si512();  // FP8: NaN codes (fp8_nan_seen)
      bool huge = false;                      // FP8: a scale fp8x16 cannot fold
      if constexpr (!kFp8) {
        tile_steps<DT, TM, TN>(ar, wr, 0, K, s, acc);
      } else {
        for (int64_t k0 = 0; k0 < K; k0 += kFp8Block) {
          const int64_t k1 = std::min(K, k0 + kFp8Block);
          for (int j = 0; j < TN; ++j) {
            const float sc = sr[j][k0 / kFp8Block];
            huge |= !(std::fabs(sc) < 0x1p120f);
            s[j] = _mm512_set1_ps(sc * 256.0f);
          }
          for (int64_t k = k0; k < k1; k += 64)
            for (int j = 0; j < TN; ++j) seen = fp8_nan_seen(seen, static_cast<const uint8_t*>(wr[j]) + k, k1 - k);
          tile_steps<DT, TM, TN>(ar, wr, k0, k1, s, acc);
        }
      }
      const int64_t rows = std::min<int64_t>(TM, M - m0), cols = std::min<int64_t>(TN, n1 - nb);
      if (kFp8 && (huge || _mm512_cmpeq_epi8_mask(seen, _mm512_set1_epi8(static_cast<char>(0xff))) != 0)) {
        fp8_tile_scalar(a, m0, rows, K, w, nb, cols, out, ldc);
        continue;
      }
      float sum[TM][TN];  // every acc summed first, at constant indices: acc stays in registers
      for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) sum[i][j] = hsum16(acc[i][j]);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) out[(m0 + i) * ldc + nb + j] = sum[i][j];
    }
  }
}

// Tiles of exactly M rows for decode (M < 4); more rows in tiles of 4, or of 6 for FP8 from 12 rows on,
// where converting the codes (about as many instructions as the FMAs they feed) is shared by more rows
// (1.05-1.15x over 4 rows at 16 rows, 2-core Zen 5; 8 x 2 tiles ran at 0.7x; converting groups of 4
// weight rows once into L1 for up to 48 rows of a at 0.75-1.1x; AVX512-VBMI byte-table lookups
// instead of the f16 image at 0.4-1.6x, slower on the large weights); the last tile is padded.
template <DType DT>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemm_rows(const float* a, int64_t M, int64_t K,
                                                                    const Weight& w, int64_t n0, int64_t n1, float* out,
                                                                    int64_t ldc) {
  if (M == 1) return gemm_tiles<DT, 1, 4>(a, M, K, w, n0, n1, out, ldc);
  if (M == 2) return gemm_tiles<DT, 2, 4>(a, M, K, w, n0, n1, out, ldc);
  if (M == 3) return gemm_tiles<DT, 3, 4>(a, M, K, w, n0, n1, out, ldc);
  if (DT == DType::F8E4M3 && M >= 12) return gemm_tiles<DT, 6, 4>(a, M, K, w, n0, n1, out, ldc);
  return gemm_tiles<DT, 4, 4>(a, M, K, w, n0, n1, out, ldc);
}

}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemm_avx512(const float* a, int64_t M, int64_t K,
                                                                      const Weight& w, int64_t n0, int64_t n1,
                                                                      float* out, int64_t ldc) {
  if (w.dtype == DType::F8E4M3) return gemm_rows<DType::F8E4M3>(a, M, K, w, n0, n1, out, ldc);
  gemm_rows<DType::BF16>(a, M, K, w, n0, n1, out, ldc);
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
