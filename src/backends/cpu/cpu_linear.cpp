// CPU back-end: linear layers and the MoE experts; weights in BF16/F16/F32 or FP8 with block
// scales. OpenBLAS sgemm on weight blocks converted to fp32; on AVX-512 CPUs BF16 weights go through
// an own kernel that widens them in registers; a few rows (decode) through AVX2 dot products.
#include <dlfcn.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_common.h"
#include "core/log.h"
#include "ops/contract.h"

namespace cpinfer {

using namespace cpu;

namespace {

// cblas.h's values for the one form the back-end calls: row-major a · wᵀ.
enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };

// out[m, n] = Σ_k a[m, k] · w[n, k] (row-major, w transposed) without OpenBLAS: blocked over n so
// a block of w rows stays in cache; one thread (the callers already split the work over OpenMP
// threads).
void builtin_sgemm(int, int, int, int M, int N, int K, float alpha, const float* a, int lda, const float* w, int ldw,
                   float beta, float* out, int ldc) {
  constexpr int kBlock = 64;
  for (int n0 = 0; n0 < N; n0 += kBlock) {
    const int n1 = std::min(N, n0 + kBlock);
    for (int m = 0; m < M; ++m) {
      const float* ar = a + static_cast<int64_t>(m) * lda;
      for (int n = n0; n < n1; ++n) {
        const float* wr = w + static_cast<int64_t>(n) * ldw;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) acc += ar[k] * wr[k];
        float* o = out + static_cast<int64_t>(m) * ldc + n;
        *o = alpha * acc + (beta == 0.0f ? 0.0f : beta * *o);
      }
    }
  }
}

// OpenBLAS, opened at run time (dlopen) rather than linked: it picks its kernels for the CPU once,
// when it is loaded, and the Debian/Ubuntu builds of 0.3.2x do not know recent AVX-512 CPUs (AMD Zen
// 4/5): they fall back to the AVX2 (Haswell) kernels. On a CPU with AVX-512 F/BW/DQ/VL and no
// OPENBLAS_CORETYPE set by the user, the back-end sets it to SkylakeX (OpenBLAS's AVX-512 kernels)
// before the library loads (on a 2-core Zen 5 its sgemm then prefilled 1.3x faster than on the AVX2
// kernels: docs/benchmarks.md, "CPU: AVX-512 kernels"). Without the
// library the back-end runs builtin_sgemm (correct, slow; the GPU machines' reference builds).
// OpenBLAS runs single-threaded inside the OpenMP threads (gemm_wt).
struct Blas {
  using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
  Sgemm sgemm = builtin_sgemm;
  std::string what = "the built-in GEMM (OpenBLAS not loaded)";
};

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
#ifdef CPINFER_HAVE_BLAS
    if (cpu_has_avx512()) setenv("OPENBLAS_CORETYPE", "SkylakeX", /*overwrite=*/0);
    void* h = nullptr;
    for (const char* name : {CPINFER_OPENBLAS_LIB, "libopenblas.so.0", "libopenblas.so"})
      if (name[0] != '\0' && (h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    auto* sgemm = h ? reinterpret_cast<Blas::Sgemm>(dlsym(h, "cblas_sgemm")) : nullptr;
    if (sgemm == nullptr) {
      log_warn("OpenBLAS (", CPINFER_OPENBLAS_LIB, " or libopenblas.so.0) could not be loaded",
               h ? "" : std::string(": ") + dlerror(), "; the CPU back-end's GEMMs use the slow built-in kernel");
      return r;
    }
    r.sgemm = sgemm;
    if (auto* threads = reinterpret_cast<void (*)(int)>(dlsym(h, "openblas_set_num_threads"))) threads(1);
    auto* core = reinterpret_cast<char* (*)()>(dlsym(h, "openblas_get_corename"));
    r.what = std::string("OpenBLAS") + (core ? std::string(" (") + core() + " kernels)" : std::string());
#endif
    return r;
  }();
  return b;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float* a, int lda, const float* w,
                 int ldw, float beta, float* out, int ldc) {
  blas().sgemm(order, ta, tb, M, N, K, alpha, a, lda, w, ldw, beta, out, ldc);
}

// fp32 copy of a block of weight rows: 1M floats (4 MiB) per thread keeps sgemm efficient without
// holding a whole converted matrix.
constexpr int64_t kScratchFloats = int64_t{1} << 20;

std::vector<float>& weight_scratch() {
  thread_local std::vector<float> buf;
  return buf;
}

std::vector<float>& act_scratch(int i) {
  thread_local std::vector<float> bufs[4];
  return bufs[i];
}

float* sized(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Up to this many rows of `a`, BF16/F16/FP8 weights are multiplied row by row without an fp32 copy.
constexpr int64_t kFewRows = 4;

// Σ x[k]·y[k] in fp32 with 8 independent partial sums (vectorizes without reassociation flags).
float dot(const float* x, const float* y, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * y[k + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; k < n; ++k) s += x[k] * y[k];
  return s;
}

// ---- FP8 (e4m3 codes with one fp32 scale per kFp8Block x kFp8Block block): every kernel forms each
// weight as transformers does, fp32(code) · scale rounded once to fp32, then multiplies as for fp32
// weights.

// The 256 e4m3 values (exact in fp32).
const float* fp8_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[static_cast<size_t>(c)] = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    return t;
  }();
  return table.data();
}

// The scales of weight row n: [ceil(K / kFp8Block)] fp32.
const float* fp8_scale_row(const Weight& w, int64_t n) {
  return w.scale.ptr<const float>() + (n / kFp8Block) * w.scale.dim(1);
}

void dequantize_fp8_row_generic(const uint8_t* codes, const float* scales, int64_t K, float* out) {
  const float* v = fp8_values();
  for (int64_t k0 = 0; k0 < K; k0 += kFp8Block) {
    const float s = scales[k0 / kFp8Block];
    const int64_t k1 = std::min(K, k0 + kFp8Block);
    for (int64_t k = k0; k < k1; ++k) out[k] = v[codes[k]] * s;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPINFER_X86_DISPATCH 1
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
  static const bool yes =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
}

bool have_avx2_fma() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// Weight rows [n0, n0 + rows) as fp32 into `out` [rows, K].
void weight_rows_f32(const Weight& w, int64_t K, int64_t n0, int64_t rows, float* out, bool simd) {
  if (w.dtype == DType::F8E4M3) {
    cpu::dequantize_fp8(w, n0, rows, out, simd);
    return;
  }
  const void* src = static_cast<const char*>(w.data) + static_cast<size_t>(n0 * K) * dtype_size(w.dtype);
#ifdef CPINFER_X86_DISPATCH
  if (w.dtype == DType::BF16 && simd) {
    static const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2");
    if (avx512) return bf16_to_f32_avx512(static_cast<const uint16_t*>(src), out, rows * K);
    if (avx2) return bf16_to_f32_avx2(static_cast<const uint16_t*>(src), out, rows * K);
  }
#endif
  to_f32(src, w.dtype, out, static_cast<size_t>(rows * K));
}

// out[:, n0, n1) = a · w[n0, n1)ᵀ on the calling thread (OpenBLAS is single-threaded here); the
// sgemm calls it makes depend only on its arguments' shapes.
void gemm_panel(const float* a, int64_t M, int64_t K, const Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldc,
                bool simd) {
  if (w.dtype == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(n1 - n0),
                static_cast<int>(K), 1.0f, a, static_cast<int>(K), w.ptr<const float>() + n0 * K, static_cast<int>(K),
                0.0f, out + n0, static_cast<int>(ldc));
    return;
  }
#ifdef CPINFER_X86_DISPATCH
  if (M <= kFewRows && simd && have_avx2_fma()) {
    few_rows_avx2(a, M, K, w, n0, n1, out, ldc);
    return;
  }
  if (M > kFewRows && w.dtype == DType::BF16 && simd && have_avx512()) {
    gemm_bf16_avx512(a, M, K, static_cast<const uint16_t*>(w.data), n0, n1, out, ldc);
    return;
  }
#endif
  if (M <= kFewRows) {
    // Few rows (decode): converting whole weight blocks to fp32 would write and re-read 2x the
    // weight's bytes for very little arithmetic; convert one row at a time into L1 and take the
    // dot products from there, so the weight is read once, in its own dtype.
    float* row = sized(weight_scratch(), K);
    for (int64_t n = n0; n < n1; ++n) {
      weight_rows_f32(w, K, n, 1, row, simd);
      for (int64_t m = 0; m < M; ++m) out[m * ldc + n] = dot(a + m * K, row, K);
    }
    return;
  }
  const int64_t block = std::clamp<int64_t>(kScratchFloats / K, 16, n1 - n0);
  float* wf = sized(weight_scratch(), block * K);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += block) {
    const int64_t nb = std::min(block, n1 - nb0);
    weight_rows_f32(w, K, nb0, nb, wf, simd);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(nb), static_cast<int>(K),
                1.0f, a, static_cast<int>(K), wf, static_cast<int>(K), 0.0f, out + nb0, static_cast<int>(ldc));
  }
}

}  // namespace

void cpu::dequantize_fp8(const Weight& w, int64_t n0, int64_t rows, float* out, bool simd) {
  const int64_t K = w.dim(1);
  const auto* codes = static_cast<const uint8_t*>(w.data);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
#ifdef CPINFER_X86_DISPATCH
    if (simd && have_avx2_fma()) {
      dequantize_fp8_row_avx2(codes + n * K, fp8_scale_row(w, n), K, out + r * K);
      continue;
    }
#endif
    dequantize_fp8_row_generic(codes + n * K, fp8_scale_row(w, n), K, out + r * K);
  }
}

void cpu::gemm_wt(const float* a, int64_t M, int64_t K, const Weight& w, float* out, int64_t ldc, bool simd) {
  const int64_t N = w.dim(0);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(out + m * ldc, out + m * ldc + N, 0.0f);
    return;
  }
  // One threading runtime only: OpenBLAS runs single-threaded inside our OpenMP threads (blas()
  // sets it so when it loads, here before the first parallel region at the latest). Its own pool
  // would spin between calls against the OpenMP team (and against other ranks' threads) on small
  // machines; column panels of one sgemm per thread parallelize just as well.
  (void)blas();
  // The work is cut into tiles that depend only on (M, N, K), never on the thread count, and each
  // tile is one fixed sequence of sgemm calls: an element's result is then the same whether one
  // thread or eight computed it, and whether the caller ran alone or beside other ranks (OpenBLAS's
  // kernels pick their blocking, and so the summation order, from the shape of each call).
  // Column panels of kPanelCols weight rows (each thread converts and streams only its panels of the
  // weight); with too few panels to share, rows of `a` are cut in chunks of kPanelRows too (the
  // router's narrow matrix over many tokens).
  constexpr int64_t kPanelCols = 128, kPanelRows = 128;
  const int64_t col_panels = (N + kPanelCols - 1) / kPanelCols;
  const int64_t row_chunk = col_panels >= 8 ? M : kPanelRows;
  const int64_t row_chunks = (M + row_chunk - 1) / row_chunk;
  const int64_t tiles = col_panels * row_chunks;
  const OmpBudget budget;
  const bool big = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) > kParallelMinMacs;
  const int nt = big ? static_cast<int>(std::min<int64_t>(budget.threads(), tiles)) : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = (t / col_panels) * row_chunk, m1 = std::min(M, m0 + row_chunk);
    const int64_t n0 = (t % col_panels) * kPanelCols, n1 = std::min(N, n0 + kPanelCols);
    gemm_panel(a + m0 * K, m1 - m0, K, w, n0, n1, out + m0 * ldc, ldc, simd);
  }
}

const std::string& cpu::gemm_library() { return blas().what; }

void CpuBackend::linear(const Tensor& a, const Weight& w, Tensor out) {
  const char* op = "linear";
  contract::linear(a, w, out);
  check_host(a, op, "a");
  check_host(w, op, "w");
  check_host(out, op, "out");
  const int64_t M = a.rows(), K = a.cols(), N = w.dim(0);
  CPI_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31), op,
            ": dimensions exceed the BLAS int range: a ", a.shape_str(), ", w ", w.shape_str());
  const float* af = a.ptr<const float>();
  if (a.dtype != DType::F32) {
    float* buf = sized(act_scratch(0), M * K);
    to_f32(a.data, a.dtype, buf, static_cast<size_t>(M * K));
    af = buf;
  }
  if (out.dtype == DType::F32) {
    gemm_wt(af, M, K, w, out.ptr<float>(), N, simd_);
    return;
  }
  float* tmp = sized(act_scratch(1), M * N);
  gemm_wt(af, M, K, w, tmp, N, simd_);
  from_f32(tmp, out.data, out.dtype, static_cast<size_t>(M * N));
}

void CpuBackend::moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                             Tensor out) {
  const char* op = "moe_experts";
  contract::moe_experts(x, ids, weights, shard, out);
  check_f32(x, op, "x");
  check_host(ids, op, "ids");
  check_host(weights, op, "weights");
  for (int32_t e = 0; e < shard.count; ++e) {
    check_host(shard.gate[e], op, "gate");
    check_host(shard.up[e], op, "up");
    check_host(shard.down[e], op, "down");
  }
  const int64_t T = x.dim(0), H = x.dim(1), K = ids.dim(1);

  // Rows routed to each local expert, in token order: (token, slot k) per row.
  const int32_t* id = ids.ptr<const int32_t>();
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(shard.count));
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = id[i];
    CPI_CHECK(e >= 0 && e < shard.n_experts, op, ": ids[", i / K, ", ", i % K, "] = ", e,
              " is not an expert id in [0, ", shard.n_experts, ")");
    if (e >= shard.first && e < shard.first + shard.count) rows[e - shard.first].push_back(i);
  }

  const float* xp = x.ptr<const float>();
  const float* wp = weights.ptr<const float>();
  float* op_out = out.ptr<float>();
  std::vector<int32_t> active;                 // local experts with rows, ascending
  int64_t largest = 0, total = 0, n_rows = 0;  // multiply-adds of the largest expert GEMM and of all
  for (int32_t e = 0; e < shard.count; ++e) {
    if (rows[e].empty()) continue;
    active.push_back(e);
    const int64_t macs = static_cast<int64_t>(rows[e].size()) * shard.gate[e].dim(0) * H;
    largest = std::max(largest, macs);
    total += 3 * macs;
    n_rows += static_cast<int64_t>(rows[e].size());
  }
  // y [n, H] of expert e = down(silu(gate(x)) ⊙ up(x)) over its rows, on this thread's scratch
  // (gemm_wt splits a product over threads only where it is large enough).
  auto expert = [&](int32_t e, float* y) {
    const std::vector<int64_t>& r = rows[e];
    const int64_t n = static_cast<int64_t>(r.size()), I = shard.gate[e].dim(0);
    float* xg = sized(act_scratch(0), n * H);
    float* gate = sized(act_scratch(1), n * I);
    float* up = sized(act_scratch(2), n * I);
    for (int64_t j = 0; j < n; ++j) std::memcpy(xg + j * H, xp + (r[j] / K) * H, static_cast<size_t>(H) * 4);
    gemm_wt(xg, n, H, shard.gate[e], gate, I, simd_);
    gemm_wt(xg, n, H, shard.up[e], up, I, simd_);
    {
      const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (n * I > kParallelMinElems)
      for (int64_t i = 0; i < n * I; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }  // the budget ends here: gemm_wt takes its own
    gemm_wt(gate, n, I, shard.down[e], y, H, simd_);
  };
  // Experts in ascending id, each adding into out: every token accumulates its experts in the same
  // order whatever the thread count (transformers' Qwen3MoeSparseMoeBlock does the same).
  auto accumulate = [&](int32_t e, const float* y) {
    const std::vector<int64_t>& r = rows[e];
    for (size_t j = 0; j < r.size(); ++j) {
      const float wt = wp[r[j]];
      float* o = op_out + (r[j] / K) * H;
      const float* yr = y + static_cast<int64_t>(j) * H;
      for (int64_t h = 0; h < H; ++h) o[h] += yr[h] * wt;
    }
  };
  // Whole experts per thread also when there are many more experts with rows than threads (a
  // prefill on a few cores): one parallel region per layer instead of one per GEMM, no barrier
  // per expert (docs/benchmarks.md, "CPU: AVX-512").
  const int threads = OmpBudget().threads();
  const bool by_expert = active.size() > 1 && static_cast<double>(total) > kParallelMinMacs && threads > 1 &&
                         (largest <= kParallelMinMacs || active.size() >= 4 * static_cast<size_t>(threads));
  if (!by_expert) {
    for (int32_t e : active) {
      float* y = sized(act_scratch(3), static_cast<int64_t>(rows[e].size()) * H);
      expert(e, y);
      accumulate(e, y);
    }
    return;
  }
  // Decode and small batches: every expert's GEMMs are too small for a team of threads of their own
  // (one token's expert is [I, H] · [H]), so the threads take whole experts instead, each writing
  // its own rows of y; the sums into out stay in expert order. An expert's result is computed by
  // the same calls whichever thread runs it, so the output does not depend on the thread count.
  std::vector<int64_t> offset(active.size() + 1, 0);
  for (size_t i = 0; i < active.size(); ++i)
    offset[i + 1] = offset[i] + static_cast<int64_t>(rows[active[i]].size()) * H;
  float* y_all = sized(act_scratch(3), n_rows * H);
  const OmpBudget budget;
  const int nt = static_cast<int>(std::min<size_t>(static_cast<size_t>(budget.threads()), active.size()));
#pragma omp parallel for schedule(dynamic) num_threads(nt)
  for (size_t i = 0; i < active.size(); ++i) expert(active[i], y_all + offset[i]);
  for (size_t i = 0; i < active.size(); ++i) accumulate(active[i], y_all + offset[i]);
}

}  // namespace cpinfer
