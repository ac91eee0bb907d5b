// The cuBLASLt descriptors of one block-scaled FP8 GEMM (cuda_fp8.cpp's dense FP8 path, and
// moe_bench's FP8 dense floor). Row-major out[M, N] = a[M, K] · w[N, K]ᵀ is the column-major
// D[N, M] = op(A) · B with A = w seen as K x N (op T) and B = a seen as K x M (op N), both
// K-contiguous (the TN layout cuBLASLt's FP8 GEMMs require); w's scales are one fp32 per 128 x 128
// block (BLK128x128_32F), a's one per (row, 128 columns) (VEC128_32F). Made once per shape and
// alignment, when it also asks cuBLASLt for its algorithm (has_algo() says whether it offered one);
// enqueue sets a call's scale pointers on `op` and enqueues it. C++17 (the benches include it).
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace cpinfer::cuda {

struct Fp8LtCall {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  // out_dtype BF16 or F32; align_*: the smallest alignment (bytes) of the pointers the calls will
  // pass; max_workspace_bytes: the most the algorithm may use. Takes cuBLASLt's first algorithm for
  // these descriptors. Throws cpinfer::Error when cuBLASLt refuses a descriptor.
  Fp8LtCall(cublasLtHandle_t lt, int64_t m, int64_t n, int64_t k, DType out_dtype, int64_t align_w, int64_t align_a,
            int64_t align_out, size_t max_workspace_bytes);
  ~Fp8LtCall();
  Fp8LtCall(const Fp8LtCall&) = delete;
  Fp8LtCall& operator=(const Fp8LtCall&) = delete;

  // Whether cuBLASLt offered an algorithm; when not, heuristic_status and heuristic_results say what
  // it answered, and enqueue answers CUBLAS_STATUS_NOT_SUPPORTED.
  bool has_algo() const { return has_algo_; }
  // out = act · wᵀ with these scales, on `stream`, with a workspace of at least workspace_bytes; the
  // first status that is not CUBLAS_STATUS_SUCCESS, else that.
  cublasStatus_t enqueue(cublasLtHandle_t lt, const void* w, const float* w_scale, const void* act,
                         const float* a_scale, void* out, void* workspace, cudaStream_t stream) const;

  const size_t workspace_bytes;
  cublasStatus_t heuristic_status = CUBLAS_STATUS_SUCCESS;
  int heuristic_results = 0;

 private:
  void release();
  cublasLtMatmulAlgo_t algo_{};
  bool has_algo_ = false;
};

}  // namespace cpinfer::cuda
