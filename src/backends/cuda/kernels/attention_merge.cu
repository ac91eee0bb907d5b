// Log-sum-exp merges of partial attentions of the same queries over disjoint key sets:
// - two, in place (context parallelism: a block's diagonal part, computed while the K/V exchange
//   is in flight, merged with its prefix part). One warp per (token, head) row: every lane reads
//   the two lse values, then the lanes stride over the row's D elements (coalesced), and lane 0
//   writes the merged lse after a warp barrier, so no lane can read an lse already overwritten;
// - the key splits of split-K attention (the decode and the generic kernels write the same partial
//   layout), into out and lse.
#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {
namespace {

constexpr float kLn2 = 0.69314718055994531f;

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

// The splits' merge: one CTA per (query, head, block) of at least max(D, kMaxSplits) threads. The
// splits' (m, l) come in parallel (thread s reads split s), the block agrees on the max and the sum,
// and thread i sums dimension i over the splits with a group of loads in flight. (A warp per
// (query, head), its lanes walking the splits a few at a time, took ~6 µs at 8 splits of decode
// and far more at 64.)
constexpr int kMaxSplits = kAttnMaxSplits;
constexpr int kMaxMergeThreads = 256;  // D <= 256
constexpr int kPre = 16;               // splits whose values a thread loads before the reductions
template <class T>
__global__ void __launch_bounds__(kMaxMergeThreads)
    attention_split_merge_kernel(const int32_t* __restrict__ blocks, int hq, int d, int n_splits,
                                 const float* __restrict__ part, T* __restrict__ out, float* __restrict__ lse) {
  pdl_wait();
  pdl_trigger();
  __shared__ float w[kMaxSplits];
  __shared__ float red[kMaxMergeThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  const int qi = blockIdx.x, h = blockIdx.y;
  const int32_t* blk = blocks + kDevAttnBlockFields * blockIdx.z;
  if (qi >= blk[1]) return;
  const int64_t row = blk[0] + qi;
  const float* p = part + (row * hq + h) * n_splits * (d + 2);
  const float m_s = tid < n_splits ? p[tid * (d + 2) + d] : -INFINITY;
  const float l_s = tid < n_splits ? p[tid * (d + 2) + d + 1] : 0.0f;
  // The first kPre splits' values of dimension tid, loaded with (m, l): one round trip to L2 before
  // the block's reductions instead of one after them.
  const float* pd = p + tid;
  float pre[kPre];
#pragma unroll
  for (int sp = 0; sp < kPre; ++sp) pre[sp] = tid < d && sp < n_splits ? pd[sp * (d + 2)] : 0.0f;
  float m = warp_max(l_s == 0.0f ? -INFINITY : m_s);  // an empty split (l = 0) weighs nothing
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = -INFINITY;
  for (int i = 0; i < n_warps; ++i) m = fmaxf(m, red[i]);
  const float wt = l_s == 0.0f ? 0.0f : fast_exp2(m_s - m);
  if (tid < n_splits) w[tid] = wt;
  const float l = block_sum(l_s * wt);  // its barriers also publish w
  if (tid >= d) return;
  float acc[2] = {0.0f, 0.0f};
#pragma unroll
  for (int sp = 0; sp < kPre; ++sp)
    if (sp < n_splits) acc[sp & 1] += pre[sp] * w[sp];
#pragma unroll 16
  for (int sp = kPre; sp < n_splits; ++sp) acc[sp & 1] += pd[sp * (d + 2)] * w[sp];
  out[(row * hq + h) * d + tid] = from_f32<T>(l > 0.0f ? (acc[0] + acc[1]) / l : 0.0f);
  if (lse != nullptr && tid == 0) lse[row * hq + h] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

}  // namespace

cudaError_t launch_attention_split_merge(const DevAttnBatch& batch, int hq, int d, int n_splits, const float* part,
                                         DevTensor out, DevTensor lse, cudaStream_t stream) {
  if (batch.n_blocks == 0 || batch.max_q_len == 0) return cudaSuccess;
  if (d < 1 || d > kMaxMergeThreads || batch.n_blocks > 65535 || hq > 65535 || n_splits < 1 || n_splits > kMaxSplits)
    return cudaErrorInvalidValue;
  const int threads = std::max(kMaxSplits, (d + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(batch.max_q_len), static_cast<unsigned>(hq),
                  static_cast<unsigned>(batch.n_blocks));
  float* lse_p = lse.defined() ? lse.ptr<float>() : nullptr;
  CPI_DISPATCH_ACT(out.dtype, "attention out", T, {
    const cudaError_t err = launch_k(attention_split_merge_kernel<T>, grid, threads, 0, stream, batch.blocks, hq, d,
                                     n_splits, part, static_cast<T*>(out.data), lse_p);
    if (err != cudaSuccess) return err;
  });
  return cudaSuccess;
}

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
