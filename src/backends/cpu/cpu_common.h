// Helpers shared by the CPU back-end's source files: argument checks with messages that name the
// op and the tensor, and small conversion helpers. Internal to src/backends/cpu/.
#pragma once
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "core/tensor.h"
#include "ops/backend.h"

namespace cpinfer::cpu {

// The 256 e4m3 values (exact in fp32).
inline const float* fp8_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[static_cast<size_t>(c)] = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    return t;
  }();
  return table.data();
}

// The scales of FP8 weight row n: [ceil(K / kFp8Block)] fp32.
inline const float* fp8_scale_row(const Weight& w, int64_t n) {
  return w.scale.ptr<const float>() + (n / kFp8Block) * w.scale.dim(1);
}

// Work below which an op stays on the calling thread. Waking an OpenMP team costs microseconds on
// an idle machine but up to milliseconds on a loaded one (CI: two shared cores), and most ops of a
// small test model are tiny: only work of roughly 0.1 ms or more gets the team.
constexpr int64_t kParallelMinElems = 1 << 17;  // element-wise and per-row ops: elements touched
constexpr double kParallelMinMacs = 1 << 22;    // matrix products and attention: multiply-adds

// Threads for one op's OpenMP team. Ranks of the local communicator are threads of one process,
// each calling its own back-end at the same time; a full team per call would oversubscribe the
// cores and every OpenMP barrier would spin against the other ranks. So an op takes the cores
// divided by the number of ops in flight when it starts (all of them when it runs alone).
class OmpBudget {
 public:
  OmpBudget() : n_(std::max(1, omp_get_max_threads() / (in_flight().fetch_add(1) + 1))) {}
  ~OmpBudget() { in_flight().fetch_sub(1); }
  OmpBudget(const OmpBudget&) = delete;
  OmpBudget& operator=(const OmpBudget&) = delete;
  int threads() const { return n_; }

 private:
  static std::atomic<int>& in_flight() {
    static std::atomic<int> n{0};
    return n;
  }
  int n_;
};

inline bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
inline bool is_index(DType t) { return t == DType::I32 || t == DType::I64; }

// Every tensor an op reads or writes: defined, on the host, non-null when non-empty.
inline void check_host(const Tensor& t, const char* op, const char* name) {
  CPI_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  CPI_CHECK(t.device == Device::CPU, op, ": tensor '", name, "' ", t.shape_str(),
            " is not on the CPU (the cpu back-end only reads host memory)");
  for (int i = 0; i < t.ndim; ++i)
    CPI_CHECK(t.shape[i] >= 0, op, ": tensor '", name, "' has a negative dimension ", t.shape_str());
  CPI_CHECK(t.numel() == 0 || t.data != nullptr, op, ": tensor '", name, "' ", t.shape_str(), " has no data");
}

// A weight (and, when FP8, its block scales) on the host.
inline void check_host(const Weight& w, const char* op, const char* name) {
  check_host(static_cast<const Tensor&>(w), op, name);
  if (w.scale.defined()) check_host(w.scale, op, name);
}

// Activations on the CPU back-end are F32 (act_dtype()).
inline void check_f32(const Tensor& t, const char* op, const char* name) {
  check_host(t, op, name);
  CPI_CHECK(t.dtype == DType::F32, op, ": tensor '", name, "' must be F32 on the cpu back-end, got ",
            dtype_name(t.dtype));
}

inline void check_float(const Tensor& t, const char* op, const char* name) {
  check_host(t, op, name);
  CPI_CHECK(is_float(t.dtype), op, ": tensor '", name, "' must be F32, F16 or BF16, got ", dtype_name(t.dtype));
}

inline void check_index(const Tensor& t, const char* op, const char* name) {
  check_host(t, op, name);
  CPI_CHECK(is_index(t.dtype), op, ": tensor '", name, "' must be I32 or I64, got ", dtype_name(t.dtype));
}

inline void check_ndim(const Tensor& t, int ndim, const char* op, const char* name) {
  CPI_CHECK(t.ndim == ndim, op, ": tensor '", name, "' must have ", ndim, " dimensions, got ", t.shape_str());
}

inline void check_same_shape(const Tensor& a, const Tensor& b, const char* op, const char* na, const char* nb) {
  bool same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; ++i) same = a.shape[i] == b.shape[i];
  CPI_CHECK(same, op, ": '", na, "' ", a.shape_str(), " and '", nb, "' ", b.shape_str(), " must have the same shape");
}

// Element i of an I32 or I64 index tensor.
inline int64_t index_at(const Tensor& t, int64_t i) {
  return t.dtype == DType::I32 ? static_cast<int64_t>(t.ptr<const int32_t>()[i]) : t.ptr<const int64_t>()[i];
}

// Checks that every index of `idx` lies in [0, n) and returns them as int64.
inline std::vector<int64_t> checked_indices(const Tensor& idx, int64_t n, const char* op, const char* name) {
  std::vector<int64_t> out(static_cast<size_t>(idx.numel()));
  for (int64_t i = 0; i < idx.numel(); ++i) {
    int64_t v = index_at(idx, i);
    CPI_CHECK(v >= 0 && v < n, op, ": ", name, "[", i, "] = ", v, " is out of range [0, ", n, ")");
    out[static_cast<size_t>(i)] = v;
  }
  return out;
}

// A [n] float vector of any float dtype as fp32.
inline std::vector<float> to_f32_vector(const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (!out.empty()) to_f32(t.data, t.dtype, out.data(), out.size());
  return out;
}

// out = x * 1/sqrt(mean(x²) + eps) * w over one row of H, as transformers' Qwen3RMSNorm does in
// fp32 (the mean of squares is summed in double so it does not depend on the summation order).
inline void rms_row(const float* x, const float* w, int64_t H, float eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(x[i]) * x[i];
  float var = static_cast<float>(ss / static_cast<double>(H));
  float r = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = (x[i] * r) * w[i];
}

inline const char* byte_ptr(const Tensor& t) { return static_cast<const char*>(t.data); }
inline char* byte_ptr_mut(const Tensor& t) { return static_cast<char*>(t.data); }

}  // namespace cpinfer::cpu
