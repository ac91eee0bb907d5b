// CPU back-end: linear layers and the MoE experts; weights in BF16/F16/F32 or FP8 with block
// scales. OpenBLAS sgemm on weight blocks converted to fp32; on AVX-512 CPUs BF16 weights, and FP8
// weights times fewer rows (decode), go through an own kernel that widens them in registers; a few
// rows otherwise through AVX2 dot products.
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_common.h"
#include "backends/cpu/cpu_x86.h"
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

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
#ifdef CPINFER_HAVE_BLAS
#ifdef CPINFER_X86_DISPATCH
    if (have_avx512()) setenv("OPENBLAS_CORETYPE", "SkylakeX", /*overwrite=*/0);
#endif
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

// On AVX-512, FP8 products of fewer rows than this convert the codes in registers (gemm_avx512); from
// here on, blocks converted once to fp32 for OpenBLAS's AVX-512 sgemm run as fast or faster (the
// in-register tiles convert each weight once per 4-6 rows of a: ~240 GFLOP/s against sgemm's ~330 at
// 512 rows, 2-core Zen 5; at 64 rows per expert a prefill's MoE was 4% slower in registers).
constexpr int64_t kFp8RegisterRows = 32;

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

void dequantize_fp8_row_generic(const uint8_t* codes, const float* scales, int64_t K, float* out) {
  const float* v = fp8_values();
  for (int64_t k0 = 0; k0 < K; k0 += kFp8Block) {
    const float s = scales[k0 / kFp8Block];
    const int64_t k1 = std::min(K, k0 + kFp8Block);
    for (int64_t k = k0; k < k1; ++k) out[k] = v[codes[k]] * s;
  }
}

// Weight rows [n0, n0 + rows) as fp32 into `out` [rows, K].
void weight_rows_f32(const Weight& w, int64_t K, int64_t n0, int64_t rows, float* out, Kernels kernels) {
  if (w.dtype == DType::F8E4M3) {
    cpu::dequantize_fp8(w, n0, rows, out, kernels);
    return;
  }
  const void* src = static_cast<const char*>(w.data) + static_cast<size_t>(n0 * K) * dtype_size(w.dtype);
#ifdef CPINFER_X86_DISPATCH
  if (w.dtype == DType::BF16) {
    if (kernels >= Kernels::Avx512) return bf16_to_f32_avx512(static_cast<const uint16_t*>(src), out, rows * K);
    if (kernels >= Kernels::Avx2) return bf16_to_f32_avx2(static_cast<const uint16_t*>(src), out, rows * K);
  }
#endif
  to_f32(src, w.dtype, out, static_cast<size_t>(rows * K));
}

// out[:, n0, n1) = a · w[n0, n1)ᵀ on the calling thread (OpenBLAS is single-threaded here); the
// sgemm calls it makes depend only on its arguments' shapes.
void gemm_panel(const float* a, int64_t M, int64_t K, const Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldc,
                Kernels kernels) {
  if (w.dtype == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(n1 - n0),
                static_cast<int>(K), 1.0f, a, static_cast<int>(K), w.ptr<const float>() + n0 * K, static_cast<int>(K),
                0.0f, out + n0, static_cast<int>(ldc));
    return;
  }
#ifdef CPINFER_X86_DISPATCH
  // AVX-512: BF16 weights from 2 rows on (2-3x the AVX2 kernel at 2-4 rows, which converts each weight
  // once per row of a; one row stays there: on a [4096, 2048] weight it ran 1.15x faster than the
  // 1-row tile), FP8 below kFp8RegisterRows rows (2-5x the AVX2 kernel and the converted blocks at 1-4
  // rows) and at any count without OpenBLAS. docs/benchmarks.md, "CPU: decode on AVX-512".
  if (kernels >= Kernels::Avx512 &&
      ((w.dtype == DType::BF16 && M >= 2) ||
       (w.dtype == DType::F8E4M3 && (M < kFp8RegisterRows || blas().sgemm == builtin_sgemm)))) {
    gemm_avx512(a, M, K, w, n0, n1, out, ldc);
    return;
  }
  if (M <= kFewRows && kernels >= Kernels::Avx2) {
    few_rows_avx2(a, M, K, w, n0, n1, out, ldc);
    return;
  }
#endif
  if (M <= kFewRows) {
    // Few rows (decode): converting whole weight blocks to fp32 would write and re-read 2x the
    // weight's bytes for very little arithmetic; convert one row at a time into L1 and take the
    // dot products from there, so the weight is read once, in its own dtype.
    float* row = sized(weight_scratch(), K);
    for (int64_t n = n0; n < n1; ++n) {
      weight_rows_f32(w, K, n, 1, row, kernels);
      for (int64_t m = 0; m < M; ++m) out[m * ldc + n] = dot(a + m * K, row, K);
    }
    return;
  }
  const int64_t block = std::clamp<int64_t>(kScratchFloats / K, 16, n1 - n0);
  float* wf = sized(weight_scratch(), block * K);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += block) {
    const int64_t nb = std::min(block, n1 - nb0);
    weight_rows_f32(w, K, nb0, nb, wf, kernels);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(nb), static_cast<int>(K),
                1.0f, a, static_cast<int>(K), wf, static_cast<int>(K), 0.0f, out + nb0, static_cast<int>(ldc));
  }
}

}  // namespace

cpu::Kernels cpu::best_kernels() {
#ifdef CPINFER_X86_DISPATCH
  if (have_avx2_fma()) return have_avx512() ? Kernels::Avx512 : Kernels::Avx2;
#endif
  return Kernels::Generic;
}

void cpu::dequantize_fp8(const Weight& w, int64_t n0, int64_t rows, float* out, Kernels kernels) {
  kernels = std::min(kernels, best_kernels());
  const int64_t K = w.dim(1);
  const auto* codes = static_cast<const uint8_t*>(w.data);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
#ifdef CPINFER_X86_DISPATCH
    if (kernels >= Kernels::Avx2) {
      dequantize_fp8_row_avx2(codes + n * K, fp8_scale_row(w, n), K, out + r * K);
      continue;
    }
#endif
    dequantize_fp8_row_generic(codes + n * K, fp8_scale_row(w, n), K, out + r * K);
  }
}

void cpu::gemm_wt(const float* a, int64_t M, int64_t K, const Weight& w, float* out, int64_t ldc, Kernels kernels) {
  kernels = std::min(kernels, best_kernels());
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
    gemm_panel(a + m0 * K, m1 - m0, K, w, n0, n1, out + m0 * ldc, ldc, kernels);
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
    gemm_wt(af, M, K, w, out.ptr<float>(), N, kernels_);
    return;
  }
  float* tmp = sized(act_scratch(1), M * N);
  gemm_wt(af, M, K, w, tmp, N, kernels_);
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
  fill_zero(out);  // the experts' sums go into a zeroed out

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
    gemm_wt(xg, n, H, shard.gate[e], gate, I, kernels_);
    gemm_wt(xg, n, H, shard.up[e], up, I, kernels_);
    {
      const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (n * I > kParallelMinElems)
      for (int64_t i = 0; i < n * I; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }  // the budget ends here: gemm_wt takes its own
    gemm_wt(gate, n, I, shard.down[e], y, H, kernels_);
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
