// CPU back-end: memory, element-wise ops, norms, embedding, router, row moves and conversions.
// Matrix products live in cpu_linear.cpp, attention/RoPE/KV in cpu_attention.cpp.
#include "backends/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <numeric>

#include "backends/cpu/cpu_common.h"
#include "core/log.h"
#include "ops/contract.h"

namespace cpinfer {

using namespace cpu;

namespace {

// Cache-line (and AVX-512) alignment for every allocation.
constexpr size_t kAlign = 64;

// Converts n elements between float dtypes; `scratch` holds n floats when neither side is F32.
void convert_span(const void* src, DType st, void* dst, DType dt, size_t n, float* scratch) {
  if (n == 0) return;
  if (st == dt) {
    std::memcpy(dst, src, n * dtype_size(st));
  } else if (dt == DType::F32) {
    to_f32(src, st, static_cast<float*>(dst), n);
  } else if (st == DType::F32) {
    from_f32(static_cast<const float*>(src), dst, dt, n);
  } else {
    to_f32(src, st, scratch, n);
    from_f32(scratch, dst, dt, n);
  }
}

// The contract's rms_norm, then what this back-end needs: host tensors, F32 activations.
void check_norm_args(const Tensor& x, const Tensor& w, float eps, const Tensor& out, const char* op,
                     const Tensor* residual = nullptr) {
  contract::rms_norm(op, x, w, eps, out, residual);
  check_f32(x, op, "x");
  check_f32(out, op, "out");
  check_host(w, op, "w");
  if (residual) check_f32(*residual, op, "residual");
}

}  // namespace

// ---- memory

void* CpuBackend::alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = ::operator new(rounded, std::align_val_t(kAlign), std::nothrow);
  CPI_CHECK(p != nullptr, "cpu alloc: out of host memory allocating ", bytes, " bytes");
  return p;
}

void CpuBackend::dealloc(void* p) {
  if (p) ::operator delete(p, std::align_val_t(kAlign));
}

void CpuBackend::upload(void* dst, const void* host_src, size_t bytes) { copy(dst, host_src, bytes); }
void CpuBackend::download(void* host_dst, const void* src, size_t bytes) { copy(host_dst, src, bytes); }

void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  CPI_CHECK(dst != nullptr && src != nullptr, "cpu copy of ", bytes, " bytes with a null pointer");
  std::memmove(dst, src, bytes);
}

void CpuBackend::fill_zero(Tensor t) {
  check_host(t, "fill_zero", "t");
  if (t.nbytes()) std::memset(t.data, 0, t.nbytes());
}

// ---- element-wise and row ops

void CpuBackend::embedding(const Tensor& table, const Tensor& ids, Tensor out) {
  const char* op = "embedding";
  contract::embedding(table, ids, out);
  check_host(table, op, "table");
  check_host(ids, op, "ids");
  check_host(out, op, "out");
  const int64_t T = ids.dim(0), H = table.dim(1);
  std::vector<int64_t> rows = checked_indices(ids, table.dim(0), op, "token id ids");
  const size_t in_row = table.row_bytes(), out_row = out.row_bytes();
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (T * H > kParallelMinElems)
  {
    std::vector<float> scratch(static_cast<size_t>(H));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      convert_span(byte_ptr(table) + rows[t] * in_row, table.dtype, byte_ptr_mut(out) + t * out_row, out.dtype,
                   static_cast<size_t>(H), scratch.data());
  }
}

void CpuBackend::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) {
  check_norm_args(x, w, eps, out, "rms_norm");
  const int64_t T = x.rows(), H = x.cols();
  std::vector<float> wf = to_f32_vector(w);
  const float* xp = x.ptr<const float>();
  float* op = out.ptr<float>();
  const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (T * H > kParallelMinElems)
  for (int64_t t = 0; t < T; ++t) rms_row(xp + t * H, wf.data(), H, eps, op + t * H);
}

void CpuBackend::add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) {
  check_norm_args(x, w, eps, out, "add_rms_norm", &residual);
  const int64_t T = x.rows(), H = x.cols();
  std::vector<float> wf = to_f32_vector(w);
  const float* xp = x.ptr<const float>();
  float* rp = residual.ptr<float>();
  float* op = out.ptr<float>();
  const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (T * H > kParallelMinElems)
  for (int64_t t = 0; t < T; ++t) {
    float* r = rp + t * H;
    for (int64_t i = 0; i < H; ++i) r[i] += xp[t * H + i];
    rms_row(r, wf.data(), H, eps, op + t * H);
  }
}

void CpuBackend::silu_mul(const Tensor& gate, const Tensor& up, Tensor out) {
  const char* op = "silu_mul";
  contract::silu_mul(gate, up, out);
  check_f32(gate, op, "gate");
  check_host(up, op, "up");
  check_host(out, op, "out");
  const int64_t n = gate.numel();
  const float* g = gate.ptr<const float>();
  const float* u = up.ptr<const float>();
  float* o = out.ptr<float>();
  const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (n > kParallelMinElems)
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void CpuBackend::add(Tensor a, const Tensor& b) {
  const char* op = "add";
  contract::add(a, b);
  check_host(a, op, "a");
  check_host(b, op, "b");
  const int64_t n = a.numel();
  if (a.dtype == DType::F32) {
    float* ap = a.ptr<float>();
    const float* bp = b.ptr<const float>();
    const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (n > kParallelMinElems)
    for (int64_t i = 0; i < n; ++i) ap[i] += bp[i];
    return;
  }
  // Half types: add in fp32, round once, chunk by chunk.
  constexpr int64_t kChunk = 1024;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const size_t es = dtype_size(a.dtype);
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (n > kParallelMinElems)
  {
    std::vector<float> fa(kChunk), fb(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      to_f32(byte_ptr(a) + begin * es, a.dtype, fa.data(), static_cast<size_t>(len));
      to_f32(byte_ptr(b) + begin * es, b.dtype, fb.data(), static_cast<size_t>(len));
      for (int64_t i = 0; i < len; ++i) fa[i] += fb[i];
      from_f32(fa.data(), byte_ptr_mut(a) + begin * es, a.dtype, static_cast<size_t>(len));
    }
  }
}

void CpuBackend::gather_rows(const Tensor& src, const Tensor& idx, Tensor out) {
  const char* op = "gather_rows";
  contract::gather_rows(src, idx, out);
  check_host(src, op, "src");
  check_index(idx, op, "idx");
  check_host(out, op, "out");
  const int64_t src_rows = src.dim(0), M = out.dim(0);
  const size_t row = contract::as_rows(src).row_bytes();
  std::vector<int64_t> rows = checked_indices(idx, src_rows, op, "idx");
  if (row == 0) return;
  const bool big = static_cast<size_t>(M) * row > kParallelMinElems * 4;
  const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (big)
  for (int64_t i = 0; i < M; ++i) std::memcpy(byte_ptr_mut(out) + i * row, byte_ptr(src) + rows[i] * row, row);
}

void CpuBackend::scatter_rows(const Tensor& src, const Tensor& idx, Tensor out) {
  const char* op = "scatter_rows";
  contract::scatter_rows(src, idx, out);
  check_host(src, op, "src");
  check_index(idx, op, "idx");
  check_host(out, op, "out");
  const int64_t out_rows = out.dim(0), M = src.dim(0);
  const size_t row = contract::as_rows(out).row_bytes();
  std::vector<int64_t> rows = checked_indices(idx, out_rows, op, "idx");
  if (row == 0) return;
  // Serial on purpose: with a repeated index the last source row wins, as a sequential reading says.
  for (int64_t i = 0; i < M; ++i) std::memcpy(byte_ptr_mut(out) + rows[i] * row, byte_ptr(src) + i * row, row);
}

void CpuBackend::convert(const Tensor& src, Tensor dst) {
  const char* op = "convert";
  contract::convert(src, dst);
  check_host(src, op, "src");
  check_host(dst, op, "dst");
  if (src.dtype == dst.dtype) {
    if (src.nbytes()) std::memmove(dst.data, src.data, src.nbytes());
    return;
  }
  constexpr int64_t kChunk = 4096;
  const int64_t n = src.numel(), n_chunks = (n + kChunk - 1) / kChunk;
  const size_t ss = dtype_size(src.dtype), ds = dtype_size(dst.dtype);
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (n > kParallelMinElems)
  {
    std::vector<float> scratch(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      convert_span(byte_ptr(src) + begin * ss, src.dtype, byte_ptr_mut(dst) + begin * ds, dst.dtype,
                   static_cast<size_t>(len), scratch.data());
    }
  }
}

// ---- router

void CpuBackend::moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) {
  const char* op = "moe_route";
  contract::moe_route(logits, top_k, ids, weights);
  check_host(logits, op, "logits");
  check_host(ids, op, "ids");
  check_host(weights, op, "weights");
  const int64_t T = logits.dim(0), E = logits.dim(1);
  const size_t in_row = logits.row_bytes();
  int32_t* id_out = ids.ptr<int32_t>();
  float* w_out = weights.ptr<float>();
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (T * E > kParallelMinElems)
  {
    std::vector<float> p(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      to_f32(byte_ptr(logits) + t * in_row, logits.dtype, p.data(), p.size());
      // softmax in fp32 with the max subtracted (the sum in double: order-independent).
      float mx = -std::numeric_limits<float>::infinity();
      for (float v : p) mx = std::max(mx, v);
      double sum = 0.0;
      for (float& v : p) {
        v = std::exp(v - mx);
        sum += v;
      }
      const float sum_f = static_cast<float>(sum);
      for (float& v : p) v = v / sum_f;
      std::iota(order.begin(), order.end(), 0);
      // Largest probability first; equal probabilities go to the lower expert id. NaN (from
      // non-finite logits) ranks last so the ordering stays strict and the sort well defined.
      auto key = [&](int32_t e) { return std::isnan(p[e]) ? -1.0f : p[e]; };
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                        [&](int32_t a, int32_t b) { return key(a) > key(b) || (key(a) == key(b) && a < b); });
      float sel_sum = 0.0f;
      for (int k = 0; k < top_k; ++k) sel_sum += p[order[k]];
      for (int k = 0; k < top_k; ++k) {
        id_out[t * top_k + k] = order[k];
        w_out[t * top_k + k] = renormalize ? p[order[k]] / sel_sum : p[order[k]];
      }
    }
  }
}

std::unique_ptr<Backend> make_cpu_backend(bool simd, bool fp8) {
  // Loads OpenBLAS now, at start-up (it reads OPENBLAS_CORETYPE then), and says which kernels run.
  static std::once_flag once;
  std::call_once(once, [] { log_info("CPU GEMMs: ", cpu::gemm_library()); });
  return std::make_unique<CpuBackend>(simd, fp8);
}

}  // namespace cpinfer
