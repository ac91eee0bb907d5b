// The residual add + RMSNorm of one row, shared by rms_norm_kernel (elementwise.cu) and the kernels
// that run it inside another one (the MoE weighted sum and the decode router, moe.cu): one source
// for the arithmetic, so a fused kernel's residual and normed row are bit for bit the two ops'.
#pragma once
#include "backends/cuda/kernels/common.cuh"

namespace cpinfer::cuda {

// v = residual + x, rounded to the residual's dtype (x in v on entry).
template <class TR>
__device__ __forceinline__ void residual_sum8(const TR* r, float (&v)[8]) {
  float rv[8];
  load8(r, rv);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_f32<TR>(from_f32<TR>(rv[i] + v[i]));
}
template <class TR>
__device__ __forceinline__ float residual_sum1(const TR* r, float x) {
  return to_f32<TR>(from_f32<TR>(to_f32<TR>(*r) + x));
}

__device__ __forceinline__ void add_squares8(float& ss, const float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
}

// out = v · inv · w for 8 elements / one element.
template <class TW, class TO>
__device__ __forceinline__ void norm_store8(TO* out, float (&v)[8], const TW* w, float inv) {
  float wv[8];
  load8(w, wv);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * wv[i];
  store8(out, v);
}
template <class TW, class TO>
__device__ __forceinline__ void norm_store1(TO* out, float v, const TW* w, float inv) {
  *out = from_f32<TO>(v * inv * to_f32<TW>(*w));
}

// Σ v² of a row in rms_norm_kernel's order: unit u belongs to thread u % vt of a block of vt =
// row_threads(units) threads, which adds its units' squares in order (add(u, ss)); the 32 sums
// of a warp are added by warp_sum, then the warps' totals by warp_sum (block_sum's order). A block
// of another size plays those vt threads (its warp w takes their warps w, w + blockDim.x / 32, ...),
// so every block size gets the same bits. Every thread of the block calls it; all get the sum.
template <class Add>
__device__ __forceinline__ float row_sum_squares(int64_t units, int vt, Add add) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  __syncthreads();  // partial[] may still be read by a previous call
  for (int base = static_cast<int>(threadIdx.x) - lane; base < vt; base += static_cast<int>(blockDim.x)) {
    float ss = 0.0f;
    for (int64_t u = base + lane; u < units; u += vt) add(u, ss);
    ss = warp_sum(ss);
    if (lane == 0) partial[base >> 5] = ss;
  }
  __syncthreads();
  return warp_sum(lane < (vt >> 5) ? partial[lane] : 0.0f);
}

__device__ __forceinline__ float rms_inverse(float sum_squares, int64_t cols, float eps) {
  return rsqrtf(sum_squares / static_cast<float>(cols) + eps);
}

}  // namespace cpinfer::cuda
