// CUDA_CHECK / CUBLAS_CHECK: turn a failed CUDA runtime or cuBLAS call into a cpinfer::Error that
// names the call, the error and the source line. CUDA_CHECK_LAUNCH checks a kernel launch.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/check.h"

namespace cpinfer::cuda {

const char* cublas_status_name(cublasStatus_t s);

// Makes `device` current for the calling thread (several back-ends may share a process).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != device) {
      const cudaError_t err = cudaSetDevice(device);
      if (err != cudaSuccess) CPI_FAIL("cudaSetDevice(", device, ") failed: ", cudaGetErrorString(err));
    }
  }
};

}  // namespace cpinfer::cuda

#define CUDA_CHECK(call)                                                                                               \
  do {                                                                                                                 \
    cudaError_t cpi_err_ = (call);                                                                                     \
    if (cpi_err_ != cudaSuccess) [[unlikely]]                                                                          \
      CPI_FAIL("CUDA call ", #call, " failed: ", cudaGetErrorName(cpi_err_), " (", cudaGetErrorString(cpi_err_), ")"); \
  } while (0)

#define CUBLAS_CHECK(call)                                                                        \
  do {                                                                                            \
    cublasStatus_t cpi_st_ = (call);                                                              \
    if (cpi_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                            \
      CPI_FAIL("cuBLAS call ", #call, " failed: ", ::cpinfer::cuda::cublas_status_name(cpi_st_)); \
  } while (0)

// Wraps a launcher of kernels/kernels.h, which returns the launch status.
#define CUDA_LAUNCH(call, kernel_name)                                                               \
  do {                                                                                               \
    cudaError_t cpi_err_ = (call);                                                                   \
    if (cpi_err_ != cudaSuccess) [[unlikely]]                                                        \
      CPI_FAIL("CUDA kernel ", kernel_name, " failed to launch: ", cudaGetErrorName(cpi_err_), " (", \
               cudaGetErrorString(cpi_err_), ")");                                                   \
  } while (0)

// After every kernel launch: catches bad launch configurations (and earlier asynchronous faults).
#define CUDA_CHECK_LAUNCH(kernel_name)                                                               \
  do {                                                                                               \
    cudaError_t cpi_err_ = cudaGetLastError();                                                       \
    if (cpi_err_ != cudaSuccess) [[unlikely]]                                                        \
      CPI_FAIL("CUDA kernel ", kernel_name, " failed to launch: ", cudaGetErrorName(cpi_err_), " (", \
               cudaGetErrorString(cpi_err_), ")");                                                   \
  } while (0)
