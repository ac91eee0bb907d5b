// Host-side argument checks shared by the CudaBackend ops (cuda_backend.cpp, cuda_attention.cpp):
// each names the op and the offending tensor.
#pragma once
#include "core/check.h"
#include "core/tensor.h"

namespace cpinfer::cuda {

inline void check_on_device(const Tensor& t, const char* op, const char* what) {
  CPI_CHECK(t.defined(), op, ": tensor '", what, "' is undefined");
  CPI_CHECK(t.device == Device::CUDA, op, ": tensor '", what, "' ", t.shape_str(),
            " is not on the CUDA device (upload it first)");
  CPI_CHECK(t.data != nullptr || t.numel() == 0, op, ": tensor '", what, "' has no data");
}

inline void check_dtype(const Tensor& t, DType want, const char* op, const char* what) {
  CPI_CHECK(t.dtype == want, op, ": tensor '", what, "' has dtype ", dtype_name(t.dtype), ", expected ",
            dtype_name(want));
}

inline void check_act(const Tensor& t, const char* op, const char* what) {
  CPI_CHECK(t.dtype == DType::BF16 || t.dtype == DType::F32, op, ": tensor '", what, "' has dtype ",
            dtype_name(t.dtype), ", expected BF16 (or F32)");
}

}  // namespace cpinfer::cuda
