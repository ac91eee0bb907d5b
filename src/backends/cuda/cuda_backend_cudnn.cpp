// CudaBackend's cuDNN prefill-attention path (PrefillKernel::Cudnn): the calls cuDNN's fused
// attention takes run there (cudnn_attention.h), the others on the own kernels.
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"

namespace cpinfer::cuda {

CudnnAttention& CudaBackend::cudnn() {
  if (!cudnn_) {
    CUDA_CHECK(cudaSetDevice(device_));
    cudnn_ = std::make_unique<CudnnAttention>(device_);
  }
  return *cudnn_;
}

std::string CudaBackend::cudnn_unavailable_reason() { return cudnn().unavailable_reason(); }

std::string CudaBackend::cudnn_check(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, const Tensor& out,
                                     const Tensor& lse, CudnnCall* call) {
  CUDA_CHECK(cudaSetDevice(device_));
  const std::vector<int32_t> blocks = flatten_attn_blocks(batch.blocks);
  const int32_t* table = batch.block_table.empty() ? nullptr : batch.block_table.data();
  return cudnn().check(dev(q), dev(batch), blocks.data(), table, dev(cache), dev(out), dev(lse), call);
}

bool CudaBackend::attention_cudnn(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale,
                                  Tensor out, Tensor lse) {
  CudnnCall call;
  if (!cudnn_check(q, batch, cache, out, lse, &call).empty()) return false;
  const size_t ws = cudnn_->workspace_bytes(dev(q), dev(batch), dev(cache), call);
  cudnn_->run(dev(q), dev(batch), dev(cache), call, scale, dev(out), dev(lse), workspace(ws), ws, stream_);
  if (call.dense) ++cudnn_dense_calls_;
  ++cudnn_calls_;
  return true;
}

}  // namespace cpinfer::cuda
