// Log-sum-exp merge of two partial attentions of the same queries over disjoint key sets, in
// place (context parallelism: a block's diagonal part, computed while the K/V exchange is in
// flight, merged with its prefix part). One warp per (token, head) row: every lane reads the two
// lse values, then the lanes stride over the row's D elements (coalesced), and lane 0 writes the
// merged lse after a warp barrier, so no lane can read an lse already overwritten.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 8;

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    attention_merge_pair_kernel(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ out2,
                                const float* __restrict__ lse2, int64_t n_rows, int d) {
  pdl_wait();
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float l1 = lse[row], l2 = lse2[row];
    T* o = out + row * d;
    const T* o2 = out2 + row * d;
    float w1 = 0.0f, w2 = 0.0f, inv = 0.0f, merged = -INFINITY;
    if (l1 != -INFINITY || l2 != -INFINITY) {  // else both key sets are empty: out 0, lse -inf
      // Weights relative to the larger lse (one of them is 1: nothing overflows). A NaN lse gives
      // NaN weights and propagates (fmaxf alone would drop it).
      const float m = fmaxf(l1, l2);
      w1 = expf(l1 - m);
      w2 = expf(l2 - m);
      inv = 1.0f / (w1 + w2);
      merged = m + logf(w1 + w2);
    }
    // A side of weight 0 (an empty key set) is skipped, not multiplied: its out is never read.
    for (int i = lane; i < d; i += 32) {
      const float a = w1 == 0.0f ? 0.0f : w1 * to_f32<T>(o[i]);
      const float b = w2 == 0.0f ? 0.0f : w2 * to_f32<T>(o2[i]);
      o[i] = from_f32<T>((a + b) * inv);
    }
    __syncwarp();
    if (lane == 0) lse[row] = merged;
  }
}

}  // namespace

cudaError_t launch_attention_merge(DevTensor out, DevTensor lse, const DevTensor& out2, const DevTensor& lse2,
                                   cudaStream_t stream) {
  const int64_t n_rows = lse.numel();
  const int d = static_cast<int>(out.cols());
  if (n_rows == 0 || d == 0) return cudaSuccess;
  const unsigned grid = grid_1d(n_rows, kWarps);
  CPI_DISPATCH_ACT(out.dtype, "attention_merge out", T, {
    launch_k(attention_merge_pair_kernel<T>, grid, kWarps * 32, 0, stream, static_cast<T*>(out.data), lse.ptr<float>(),
             static_cast<const T*>(out2.data), lse2.ptr<const float>(), n_rows, d);
  });
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
