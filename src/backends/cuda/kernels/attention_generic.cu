// Generic causal paged attention: one warp per (query, head[, key split]), any head_dim <= 256,
// any block size, F32 or BF16 q/out/cache. The fallback for head dims other than 128 (test
// fixtures) and the decode path (q_len = 1). Lane l owns dims l, l+32, ...; keys are taken 8 at a
// time, from the block's kv_begin, so that the online softmax rescales once per chunk.
//
// Decode has few (query, head) pairs and long key ranges, so the keys are split over n_splits
// warps that write partial (max, sum, acc) to a workspace, merged by a second kernel
// (attention_merge.cu's split merge, which the decode kernel's splits share).
#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDPer = 8;  // 256 / 32
constexpr int kChunk = 8;
constexpr float kLn2 = 0.69314718055994531f;

// Partial results of split s of (row, h): part[((row * hq + h) * n_splits + s) * (d + 2) + ...]
// holds acc[0..d), then m (log2 units) and l.
template <class T, class TC>
__global__ void __launch_bounds__(kWarps * 32)
    attention_generic_kernel(const T* __restrict__ q, const int32_t* __restrict__ blocks,
                             const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                             const TC* __restrict__ cache_k, const TC* __restrict__ cache_v, int block_size,
                             int n_pages, int hq, int hkv, int d, float scale_log2, int n_splits, int split_len,
                             T* __restrict__ out, float* __restrict__ lse, float* __restrict__ part) {
  pdl_wait();
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int qi = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int h = blockIdx.y;
  const int split = blockIdx.z % n_splits;
  const int32_t* blk = blocks + kDevAttnBlockFields * (blockIdx.z / n_splits);
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3];
  if (qi >= q_len) return;
  const int64_t row = q_begin + qi;
  // The query's keys are [key_lo, key_hi) (clamped: an empty range stays empty); split s takes
  // the s-th run of split_len of them (no overflow when split_len is INT32_MAX).
  const int key_hi = min(blk[5], pos_begin + qi + 1);
  const int key_lo = min(blk[4], key_hi);
  const int key_begin = key_lo + split * split_len;
  const int key_end = key_hi - key_begin < split_len ? key_hi : key_begin + split_len;
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
  for (int k0 = key_begin; k0 < key_end; k0 += kChunk) {
    float s[kChunk];
    const TC* vrow[kChunk];
    float cmax = -INFINITY;
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const int key = k0 + c;
      s[c] = -INFINITY;
      vrow[c] = nullptr;
      const int page = key < key_end ? table[key / block_size] : -1;
      // Warp-uniform; a block-table entry outside the cache skips the key instead of faulting.
      if (static_cast<unsigned>(page) < static_cast<unsigned>(n_pages)) {
        const int64_t slot = static_cast<int64_t>(page) * block_size + key % block_size;
        const int64_t base = (slot * hkv + kvh) * d;
        const TC* krow = cache_k + base;
        vrow[c] = cache_v + base;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxDPer; ++j) {
          const int dd = lane + 32 * j;
          if (dd < d) dot += qv[j] * to_f32<TC>(krow[dd]);
        }
        s[c] = warp_sum(dot);
        cmax = fmaxf(cmax, s[c]);
      }
    }
    if (cmax == -INFINITY) continue;  // no usable key in this chunk
    const float m_new = fmaxf(m, cmax);
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
  if (n_splits > 1) {  // partial result; an empty split leaves m = -inf, l = 0
    float* p = part + ((row * hq + h) * n_splits + split) * (d + 2);
#pragma unroll
    for (int j = 0; j < kMaxDPer; ++j) {
      const int dd = lane + 32 * j;
      if (dd < d) p[dd] = acc[j];
    }
    if (lane == 0) {
      p[d] = m;
      p[d + 1] = l;
    }
    return;
  }
  T* orow = out + (row * hq + h) * d;
  const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxDPer; ++j) {
    const int dd = lane + 32 * j;
    if (dd < d) orow[dd] = from_f32<T>(acc[j] * inv_l);
  }
  if (lse != nullptr && lane == 0) lse[row * hq + h] = (m + log2f(l)) * kLn2;
}

}  // namespace

int attention_generic_splits(int n_rows, int hq, int max_keys) {
  // Enough warps to fill the GPU (~4096) and at least 256 keys per split; at most 32 splits.
  const int64_t pairs = static_cast<int64_t>(n_rows) * hq;
  if (pairs <= 0 || pairs >= 4096) return 1;
  int64_t by_work = (4096 + pairs - 1) / pairs;
  int64_t by_keys = (max_keys + 255) / 256;
  int64_t s = std::min<int64_t>(std::min(by_work, by_keys), 32);
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t launch_attention_generic(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                     DevTensor out, DevTensor lse, int n_splits, int max_keys, float* part,
                                     cudaStream_t stream) {
  const int hq = static_cast<int>(q.dim(1)), d = static_cast<int>(q.dim(2));
  const int hkv = static_cast<int>(cache.k.dim(2));
  const int n_blocks = batch.n_blocks;
  const int max_q = batch.max_q_len;
  if (n_blocks == 0 || max_q == 0) return cudaSuccess;
  if (n_splits < 1 || n_splits > kAttnMaxSplits || (n_splits > 1 && part == nullptr)) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(n_blocks) * n_splits > 65535 || hq > 65535 || d > kMaxDPer * 32)
    return cudaErrorInvalidValue;
  // Keys per split: a multiple of the chunk so that splits never share a chunk.
  const int split_len = ((max_keys + n_splits - 1) / n_splits + kChunk - 1) / kChunk * kChunk;
  const unsigned gx = static_cast<unsigned>((max_q + kWarps - 1) / kWarps);
  const dim3 grid(gx, static_cast<unsigned>(hq), static_cast<unsigned>(n_blocks * n_splits));
  const float scale_log2 = scale * 1.4426950408889634f;
  float* lse_p = lse.defined() ? lse.ptr<float>() : nullptr;
  CPI_DISPATCH_ACT(q.dtype, "attention q", T, CPI_DISPATCH_ACT(cache.k.dtype, "attention cache", TC, {
                     launch_k(attention_generic_kernel<T, TC>, grid, kWarps * 32, 0, stream,
                              static_cast<const T*>(q.data), batch.blocks, batch.block_table, batch.max_blocks_per_seq,
                              static_cast<const TC*>(cache.k.data), static_cast<const TC*>(cache.v.data),
                              cache.block_size(), static_cast<int>(cache.k.dim(0)), hq, hkv, d, scale_log2, n_splits,
                              n_splits > 1 ? split_len : INT32_MAX, static_cast<T*>(out.data), lse_p, part);
                   }));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || n_splits == 1) return err;
  return launch_attention_split_merge(batch, hq, d, n_splits, part, out, lse, stream);
}

}  // namespace cpinfer::cuda
