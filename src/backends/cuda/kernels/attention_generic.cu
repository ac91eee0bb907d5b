// Generic causal paged attention: one warp per (query, head), any head_dim <= 256, any block
// size, F32 or BF16 q/out/cache. The fallback for head dims other than 128 (test fixtures) and the
// decode path (q_len = 1). Lane l owns dims l, l+32, ...; keys are taken 8 at a time so that the
// online softmax rescales once per chunk.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDPer = 8;  // 256 / 32
constexpr int kChunk = 8;

template <class T, class TC>
__global__ void __launch_bounds__(kWarps * 32)
    attention_generic_kernel(const T* __restrict__ q, const int32_t* __restrict__ blocks,
                             const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                             const TC* __restrict__ cache_k, const TC* __restrict__ cache_v, int block_size, int hq,
                             int hkv, int d, float scale_log2, T* __restrict__ out, float* __restrict__ lse) {
  const int lane = threadIdx.x & 31;
  const int qi = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int h = blockIdx.y;
  const int32_t* blk = blocks + 4 * blockIdx.z;
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3];
  if (qi >= q_len) return;
  const int64_t row = q_begin + qi;
  const int n_keys = pos_begin + qi + 1;
  const int kvh = h / (hq / hkv);
  const int32_t* table = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;

  float qv[kMaxDPer], acc[kMaxDPer];
  const T* qrow = q + (row * hq + h) * d;
#pragma unroll
  for (int j = 0; j < kMaxDPer; ++j) {
    const int dd = lane + 32 * j;
    qv[j] = dd < d ? to_f32<T>(qrow[dd]) * scale_log2 : 0.0f;
    acc[j] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int k0 = 0; k0 < n_keys; k0 += kChunk) {
    float s[kChunk];
    const TC* vrow[kChunk];
    float cmax = -INFINITY;
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const int key = k0 + c;
      s[c] = -INFINITY;
      vrow[c] = nullptr;
      if (key < n_keys) {  // warp-uniform
        const int64_t slot = static_cast<int64_t>(table[key / block_size]) * block_size + key % block_size;
        const int64_t base = (slot * hkv + kvh) * d;
        const TC* krow = cache_k + base;
        vrow[c] = cache_v + base;
        float part = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxDPer; ++j) {
          const int dd = lane + 32 * j;
          if (dd < d) part += qv[j] * to_f32<TC>(krow[dd]);
        }
        s[c] = warp_sum(part);
        cmax = fmaxf(cmax, s[c]);
      }
    }
    const float m_new = fmaxf(m, cmax);  // finite: every chunk has at least one key
    const float corr = exp2f(m - m_new);
    l *= corr;
#pragma unroll
    for (int j = 0; j < kMaxDPer; ++j) acc[j] *= corr;
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (vrow[c] == nullptr) continue;
      const float p = exp2f(s[c] - m_new);
      l += p;
#pragma unroll
      for (int j = 0; j < kMaxDPer; ++j) {
        const int dd = lane + 32 * j;
        if (dd < d) acc[j] += p * to_f32<TC>(vrow[c][dd]);
      }
    }
    m = m_new;
  }
  T* orow = out + (row * hq + h) * d;
  const float inv_l = 1.0f / l;
#pragma unroll
  for (int j = 0; j < kMaxDPer; ++j) {
    const int dd = lane + 32 * j;
    if (dd < d) orow[dd] = from_f32<T>(acc[j] * inv_l);
  }
  if (lse != nullptr && lane == 0) lse[row * hq + h] = (m + log2f(l)) * 0.69314718055994531f;
}

}  // namespace

cudaError_t launch_attention_generic(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                              DevTensor out, DevTensor lse, cudaStream_t stream) {
  const int hq = static_cast<int>(q.dim(1)), d = static_cast<int>(q.dim(2));
  const int hkv = static_cast<int>(cache.k.dim(2));
  const int n_blocks = batch.n_blocks;
  const int max_q = batch.max_q_len;
  if (n_blocks == 0 || max_q == 0) return cudaSuccess;
  if (n_blocks > 65535 || hq > 65535 || d > kMaxDPer * 32) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((max_q + kWarps - 1) / kWarps), static_cast<unsigned>(hq),
                  static_cast<unsigned>(n_blocks));
  const float scale_log2 = scale * 1.4426950408889634f;
  float* lse_p = lse.defined() ? lse.ptr<float>() : nullptr;
  CPI_DISPATCH_ACT(q.dtype, "attention q", T, CPI_DISPATCH_ACT(cache.k.dtype, "attention cache", TC, {
    attention_generic_kernel<T, TC><<<grid, kWarps * 32, 0, stream>>>(
        static_cast<const T*>(q.data), batch.blocks, batch.block_table,
        batch.max_blocks_per_seq, static_cast<const TC*>(cache.k.data), static_cast<const TC*>(cache.v.data),
        cache.block_size(), hq, hkv, d, scale_log2, static_cast<T*>(out.data), lse_p);
  }));
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
