#include "ops/contract.h"

#include <cmath>

namespace cpinfer::contract {

namespace {
bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
}  // namespace

void qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                  const Tensor& positions, const RopeParams& rope) {
  const char* op = "qk_norm_rope";
  CPI_CHECK(q.ndim == 3 && k.ndim == 3 && q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2), op, ": q ", q.shape_str(),
            " and k ", k.shape_str(), " must be [T, Hq, D] and [T, Hkv, D]");
  CPI_CHECK(is_float(q.dtype) && q.dtype == k.dtype, op, ": q and k must share one float dtype, got ",
            dtype_name(q.dtype), " and ", dtype_name(k.dtype));
  const int64_t d = q.dim(2);
  CPI_CHECK(d % 2 == 0, op, ": head_dim ", d, " must be even for rotate_half RoPE");
  CPI_CHECK(static_cast<int64_t>(rope.inv_freq.size()) == d / 2, op, ": rope.inv_freq has ", rope.inv_freq.size(),
            " entries, head_dim ", d, " needs ", d / 2);
  CPI_CHECK(q_norm_w.defined() == k_norm_w.defined(), op, ": give both q/k norm weights or neither");
  if (q_norm_w.defined()) {
    CPI_CHECK(q_norm_w.numel() == d && k_norm_w.numel() == d, op, ": norm weights ", q_norm_w.shape_str(), " / ",
              k_norm_w.shape_str(), " must have head_dim = ", d, " elements");
    CPI_CHECK(is_float(q_norm_w.dtype) && is_float(k_norm_w.dtype), op, ": norm weights must be float");
  }
  CPI_CHECK(std::isfinite(eps) && eps >= 0.0f, op, ": eps must be finite and >= 0, got ", eps);
  CPI_CHECK((positions.dtype == DType::I32 || positions.dtype == DType::I64) && positions.ndim == 1 &&
                positions.dim(0) == q.dim(0),
            op, ": positions ", positions.shape_str(), " ", dtype_name(positions.dtype), " must be [T = ", q.dim(0),
            "] I32 (I64 where the back-end reads them on the host)");
}

}  // namespace cpinfer::contract
