// CPU back-end: linear layers and the MoE experts, on OpenBLAS sgemm.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_common.h"

namespace cpinfer {

using namespace cpu;

namespace {

// fp32 copy of a block of weight rows: 2M floats (8 MiB) keeps sgemm efficient without holding a
// whole converted matrix.
constexpr int64_t kScratchFloats = int64_t{1} << 21;

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

}  // namespace

void cpu::gemm_wt(const float* a, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N, float* out,
                  int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(out + m * ldc, out + m * ldc + N, 0.0f);
    return;
  }
  if (w_dtype == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                static_cast<int>(K), 1.0f, a, static_cast<int>(K), static_cast<const float*>(w), static_cast<int>(K),
                0.0f, out, static_cast<int>(ldc));
    return;
  }
  const int64_t block = std::clamp<int64_t>(kScratchFloats / K, 16, N);
  float* wf = sized(weight_scratch(), block * K);
  const size_t es = dtype_size(w_dtype);
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (nb * K > (1 << 16))
    for (int64_t r = 0; r < nb; ++r)
      to_f32(static_cast<const char*>(w) + static_cast<size_t>((n0 + r) * K) * es, w_dtype, wf + r * K,
             static_cast<size_t>(K));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(nb),
                static_cast<int>(K), 1.0f, a, static_cast<int>(K), wf, static_cast<int>(K), 0.0f, out + n0,
                static_cast<int>(ldc));
  }
}

void CpuBackend::linear(const Tensor& a, const Tensor& w, Tensor out) {
  const char* op = "linear";
  check_float(a, op, "a");
  check_float(w, op, "w");
  check_float(out, op, "out");
  check_ndim(w, 2, op, "w");
  const int64_t M = a.rows(), K = a.cols(), N = w.dim(0);
  CPI_CHECK(w.dim(1) == K, op, ": weight ", w.shape_str(), " needs ", K, " columns to multiply a ", a.shape_str());
  CPI_CHECK(out.rows() == M && out.cols() == N, op, ": out ", out.shape_str(), " must be [", M, ", ", N,
            "] for a ", a.shape_str(), " and w ", w.shape_str());
  CPI_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31), op,
            ": dimensions exceed the BLAS int range: a ", a.shape_str(), ", w ", w.shape_str());
  const float* af = a.ptr<const float>();
  if (a.dtype != DType::F32) {
    float* buf = sized(act_scratch(0), M * K);
    to_f32(a.data, a.dtype, buf, static_cast<size_t>(M * K));
    af = buf;
  }
  if (out.dtype == DType::F32) {
    gemm_wt(af, M, K, w.data, w.dtype, N, out.ptr<float>(), N);
    return;
  }
  float* tmp = sized(act_scratch(1), M * N);
  gemm_wt(af, M, K, w.data, w.dtype, N, tmp, N);
  from_f32(tmp, out.data, out.dtype, static_cast<size_t>(M * N));
}

void CpuBackend::moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                             Tensor out) {
  const char* op = "moe_experts";
  check_f32(x, op, "x");
  check_f32(out, op, "out");
  check_f32(weights, op, "weights");
  check_host(ids, op, "ids");
  check_ndim(x, 2, op, "x");
  check_ndim(ids, 2, op, "ids");
  check_same_shape(x, out, op, "x", "out");
  check_same_shape(ids, weights, op, "ids", "weights");
  CPI_CHECK(ids.dtype == DType::I32, op, ": ids must be I32, got ", dtype_name(ids.dtype));
  const int64_t T = x.dim(0), H = x.dim(1), K = ids.dim(1);
  CPI_CHECK(ids.dim(0) == T, op, ": ids ", ids.shape_str(), " must have one row per token of x ", x.shape_str());
  CPI_CHECK(shard.n_experts > 0 && shard.first >= 0 && shard.count >= 0 &&
                shard.first + shard.count <= shard.n_experts,
            op, ": expert shard [", shard.first, ", ", shard.first + shard.count, ") is not inside [0, ",
            shard.n_experts, ")");
  CPI_CHECK(shard.gate.size() == static_cast<size_t>(shard.count) &&
                shard.up.size() == static_cast<size_t>(shard.count) &&
                shard.down.size() == static_cast<size_t>(shard.count),
            op, ": shard holds ", shard.count, " experts but has ", shard.gate.size(), " gate, ", shard.up.size(),
            " up and ", shard.down.size(), " down matrices");
  for (int32_t e = 0; e < shard.count; ++e) {
    const Tensor &g = shard.gate[e], &u = shard.up[e], &d = shard.down[e];
    check_float(g, op, "gate");
    check_float(u, op, "up");
    check_float(d, op, "down");
    check_ndim(g, 2, op, "gate");
    const int64_t I = g.dim(0);
    CPI_CHECK(g.dim(1) == H && u.ndim == 2 && u.dim(0) == I && u.dim(1) == H && d.ndim == 2 && d.dim(0) == H &&
                  d.dim(1) == I,
              op, ": expert ", shard.first + e, " has gate ", g.shape_str(), ", up ", u.shape_str(), ", down ",
              d.shape_str(), "; expected [I, ", H, "], [I, ", H, "], [", H, ", I]");
  }

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
  // Experts in ascending id, each adding into out: every token accumulates its experts in the same
  // order whatever the thread count (transformers' Qwen3MoeSparseMoeBlock does the same).
  for (int32_t e = 0; e < shard.count; ++e) {
    const std::vector<int64_t>& r = rows[e];
    if (r.empty()) continue;
    const int64_t n = static_cast<int64_t>(r.size()), I = shard.gate[e].dim(0);
    float* xg = sized(act_scratch(0), n * H);
    float* gate = sized(act_scratch(1), n * I);
    float* up = sized(act_scratch(2), n * I);
    float* y = sized(act_scratch(3), n * H);
    for (int64_t j = 0; j < n; ++j) std::memcpy(xg + j * H, xp + (r[j] / K) * H, static_cast<size_t>(H) * 4);
    gemm_wt(xg, n, H, shard.gate[e].data, shard.gate[e].dtype, I, gate, I);
    gemm_wt(xg, n, H, shard.up[e].data, shard.up[e].dtype, I, up, I);
    const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (n * I > (1 << 14))
    for (int64_t i = 0; i < n * I; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    gemm_wt(gate, n, I, shard.down[e].data, shard.down[e].dtype, H, y, H);
    for (int64_t j = 0; j < n; ++j) {
      const float wt = wp[r[j]];
      float* o = op_out + (r[j] / K) * H;
      const float* yr = y + j * H;
      for (int64_t h = 0; h < H; ++h) o[h] += yr[h] * wt;
    }
  }
}

}  // namespace cpinfer
