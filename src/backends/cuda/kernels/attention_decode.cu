// Decode attention (one query row per block), head_dim 128, BF16 q and cache: one CTA per
// (block, KV head, key split) serves all G query heads that share the KV head, so each K/V row
// is read from memory once per step, not G times. K and V arrive in tiles of 64 keys by 16-byte
// cp.async (zero fill outside the key range or the cache), double-buffered so that the next
// tile's loads are in flight while this one is used: the kernel is bound by the bandwidth of the
// cache reads, as decode is. Splits write partial (acc, max, sum) that attention_generic.cu's
// merge kernel combines, the same log-sum-exp merge context parallelism uses across ranks.
//
// Per tile: the scores S[g, j] (fp32, log2 units) go to shared memory, thread (j, g-parity)
// computing them for its key; then the threads of head g (128 / G of them) each own G output
// dims, take the tile's row max, rescale and accumulate P·V from shared memory.
#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 64;              // keys per tile
constexpr int kD = 128;                // head_dim
constexpr int kRow = kD + 8;           // BF16 elements per shared-memory row (272 B: no bank conflicts)
constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks per row
constexpr float kLn2 = 0.69314718055994531f;

template <int G>
constexpr size_t smem_bytes() {
  return size_t{2} * 2 * kTile * kRow * sizeof(__nv_bfloat16) + size_t{G} * kD * sizeof(float) +
         size_t{G} * kTile * sizeof(float);
}

// Slot of key `key` of the sequence whose table row is `table`, or -1 when the entry is outside
// the cache (the key is then skipped, never read).
__device__ __forceinline__ int64_t key_slot(const int32_t* table, int key, int block_size, int n_pages) {
  const int page = table[key / block_size];
  if (static_cast<unsigned>(page) >= static_cast<unsigned>(n_pages)) return -1;
  return static_cast<int64_t>(page) * block_size + key % block_size;
}

template <int G>
__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ blocks,
                            const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                            const __nv_bfloat16* __restrict__ cache_k, const __nv_bfloat16* __restrict__ cache_v,
                            int block_size, int n_pages, int hq, int hkv, float scale_log2, int n_splits, int split_len,
                            __nv_bfloat16* __restrict__ out, float* __restrict__ lse, float* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto* sk = reinterpret_cast<__nv_bfloat16*>(smem);           // [2][kTile][kRow]
  __nv_bfloat16* sv = sk + 2 * kTile * kRow;                   // [2][kTile][kRow]
  auto* sq = reinterpret_cast<float*>(sv + 2 * kTile * kRow);  // [G][kD], scaled to log2 units
  float* ss = sq + G * kD;                                     // [G][kTile]

  const int tid = threadIdx.x;
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int32_t* blk = blocks + kDevAttnBlockFields * blockIdx.z;
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3];
  if (q_len < 1) return;
  // Keys [key_lo, key_hi) (an empty range stays empty); this split takes the split-th run of
  // split_len of them.
  const int key_hi = min(blk[5], pos_begin + 1);
  const int key_lo = min(blk[4], key_hi);
  const int64_t kb = static_cast<int64_t>(key_lo) + static_cast<int64_t>(split) * split_len;
  const int key_begin = static_cast<int>(kb < key_hi ? kb : key_hi);
  const int key_end = static_cast<int>(kb + split_len < key_hi ? kb + split_len : key_hi);
  const int32_t* table = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int64_t row = q_begin;
  const int h0 = kvh * G;

  for (int i = tid; i < G * kD; i += kThreads) sq[i] = __bfloat162float(q[(row * hq + h0) * kD + i]) * scale_log2;

  const int n_tiles = (key_end - key_begin + kTile - 1) / kTile;
  auto load_tile = [&](int tile, int stage) {
    __nv_bfloat16* dk = sk + stage * kTile * kRow;
    __nv_bfloat16* dv = sv + stage * kTile * kRow;
#pragma unroll
    for (int c = tid; c < kTile * kChunksPerRow; c += kThreads) {
      const int j = c / kChunksPerRow, part16 = c % kChunksPerRow;
      const int key = key_begin + tile * kTile + j;
      const int64_t slot = key < key_end ? key_slot(table, key, block_size, n_pages) : -1;
      const int64_t base = slot >= 0 ? (slot * hkv + kvh) * kD + part16 * 8 : 0;
      cp_async16(dk + j * kRow + part16 * 8, cache_k + base, slot >= 0);
      cp_async16(dv + j * kRow + part16 * 8, cache_v + base, slot >= 0);
    }
    cp_async_commit();
  };

  // P·V ownership: head g = tid / kPerHead, dims [d0, d0 + G).
  constexpr int kPerHead = kThreads / G;
  const int g = tid / kPerHead;
  const int d0 = (tid % kPerHead) * G;
  float acc[G];
#pragma unroll
  for (int i = 0; i < G; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;

  if (n_tiles > 0) load_tile(0, 0);
  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) {
      load_tile(t + 1, (t + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t (and, on the first pass, sq) visible to every thread
    const __nv_bfloat16* K = sk + (t & 1) * kTile * kRow;
    const __nv_bfloat16* V = sv + (t & 1) * kTile * kRow;

    // Scores: thread (j = tid % kTile, parity = tid / kTile) takes heads parity, parity + 2, ...
    {
      constexpr int kHalf = (G + 1) / 2;
      const int j = tid % kTile, parity = tid / kTile;
      const int key = key_begin + t * kTile + j;
      const bool valid = key < key_end && key_slot(table, key, block_size, n_pages) >= 0;
      float dot[kHalf];
#pragma unroll
      for (int i = 0; i < kHalf; ++i) dot[i] = 0.0f;
      const __nv_bfloat16* kr = K + j * kRow;
#pragma unroll 4
      for (int dd = 0; dd < kD; dd += 8) {
        float kv[8];
        load8(kr + dd, kv);
#pragma unroll
        for (int i = 0; i < kHalf; ++i) {
          const int gg = parity + 2 * i;
          if (gg < G) {
            const float4 qa = *reinterpret_cast<const float4*>(sq + gg * kD + dd);
            const float4 qb = *reinterpret_cast<const float4*>(sq + gg * kD + dd + 4);
            dot[i] += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] +
                      qb.z * kv[6] + qb.w * kv[7];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const int gg = parity + 2 * i;
        if (gg < G) ss[gg * kTile + j] = valid ? dot[i] : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax and P·V for head g, dims [d0, d0 + G).
    {
      const float* sg = ss + g * kTile;
      float tmax = -INFINITY;
#pragma unroll 8
      for (int j = 0; j < kTile; ++j) tmax = fmaxf(tmax, sg[j]);
      if (tmax != -INFINITY) {
        const float m_new = fmaxf(m, tmax);
        const float corr = exp2f(m - m_new);
        l *= corr;
#pragma unroll
        for (int i = 0; i < G; ++i) acc[i] *= corr;
#pragma unroll 4
        for (int j = 0; j < kTile; ++j) {
          const float p = exp2f(sg[j] - m_new);
          l += p;
          const __nv_bfloat16* vr = V + j * kRow + d0;
          if constexpr (G >= 8) {
#pragma unroll
            for (int i = 0; i < G; i += 8) {
              float vv[8];
              load8(vr + i, vv);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[i + e] += p * vv[e];
            }
          } else {
#pragma unroll
            for (int i = 0; i < G; ++i) acc[i] += p * __bfloat162float(vr[i]);
          }
        }
        m = m_new;
      }
    }
    __syncthreads();  // every thread is done with this stage before it is loaded again
  }

  const int h = h0 + g;
  const bool leader = tid % kPerHead == 0;
  if (n_splits > 1) {  // partial result; an empty split leaves m = -inf, l = 0
    float* p = part + ((row * hq + h) * n_splits + split) * (kD + 2);
#pragma unroll
    for (int i = 0; i < G; ++i) p[d0 + i] = acc[i];
    if (leader) {
      p[kD] = m;
      p[kD + 1] = l;
    }
    return;
  }
  const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
  __nv_bfloat16* orow = out + (row * hq + h) * kD + d0;
#pragma unroll
  for (int i = 0; i < G; ++i) orow[i] = __float2bfloat16_rn(acc[i] * inv_l);
  if (lse != nullptr && leader) lse[row * hq + h] = (m + log2f(l)) * kLn2;
}

template <int G>
cudaError_t launch_g(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale_log2, DevTensor out,
                     float* lse, int n_splits, int split_len, float* part, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<G>();
  static_assert(bytes <= 227 * 1024, "decode attention tiles exceed shared memory");
  cudaError_t err = cudaFuncSetAttribute(attention_decode_kernel<G>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const int hkv = static_cast<int>(cache.k.dim(2));
  const dim3 grid(static_cast<unsigned>(n_splits), static_cast<unsigned>(hkv), static_cast<unsigned>(batch.n_blocks));
  attention_decode_kernel<G><<<grid, kThreads, bytes, stream>>>(
      q.ptr<const __nv_bfloat16>(), batch.blocks, batch.block_table, batch.max_blocks_per_seq,
      cache.k.ptr<const __nv_bfloat16>(), cache.v.ptr<const __nv_bfloat16>(), cache.block_size(),
      static_cast<int>(cache.k.dim(0)), static_cast<int>(q.dim(1)), hkv, scale_log2, n_splits, split_len,
      out.ptr<__nv_bfloat16>(), lse, part);
  return cudaGetLastError();
}

}  // namespace

bool attention_decode_supported(const DevTensor& q, const DevKv& cache, int max_q_len) {
  if (max_q_len != 1 || q.dtype != DType::BF16 || cache.k.dtype != DType::BF16 || q.ndim != 3 || q.dim(2) != kD)
    return false;
  const int64_t hq = q.dim(1), hkv = cache.k.dim(2);
  if (hkv <= 0 || hq % hkv != 0) return false;
  const int64_t g = hq / hkv;
  return (g == 1 || g == 2 || g == 4 || g == 8 || g == 16) && aligned16(q.data) && aligned16(cache.k.data) &&
         aligned16(cache.v.data);
}

int attention_decode_splits(int n_blocks, int hkv, int max_keys, int n_sms) {
  // About two CTAs per SM in all, and at least two tiles (128 keys) per split; at most 64 splits.
  const int64_t ctas = static_cast<int64_t>(n_blocks) * hkv;
  if (ctas <= 0) return 1;
  const int64_t by_work = (2 * static_cast<int64_t>(n_sms) + ctas - 1) / ctas;
  const int64_t by_keys = (static_cast<int64_t>(max_keys) + 2 * kTile - 1) / (2 * kTile);
  const int64_t s = std::min<int64_t>(std::min(by_work, by_keys), 64);
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t launch_attention_decode(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                    DevTensor out, DevTensor lse, int n_splits, int max_keys, float* part,
                                    cudaStream_t stream) {
  if (batch.n_blocks == 0 || batch.max_q_len == 0) return cudaSuccess;
  if (!attention_decode_supported(q, cache, batch.max_q_len) || n_splits < 1 || n_splits > 65535 ||
      batch.n_blocks > 65535 || (n_splits > 1 && part == nullptr))
    return cudaErrorInvalidValue;
  // Keys per split: whole tiles, so that splits never share one.
  const int split_len = n_splits > 1 ? ((max_keys + n_splits - 1) / n_splits + kTile - 1) / kTile * kTile : INT32_MAX;
  const float scale_log2 = scale * 1.4426950408889634f;
  float* lse_p = lse.defined() ? lse.ptr<float>() : nullptr;
  const int64_t g = q.dim(1) / cache.k.dim(2);  // 1, 2, 4, 8 or 16 (attention_decode_supported)
  const auto launch = g == 1   ? launch_g<1>
                      : g == 2 ? launch_g<2>
                      : g == 4 ? launch_g<4>
                      : g == 8 ? launch_g<8>
                               : launch_g<16>;
  const cudaError_t err = launch(q, batch, cache, scale_log2, out, lse_p, n_splits, split_len, part, stream);
  if (err != cudaSuccess || n_splits == 1) return err;
  return launch_attention_split_merge(batch, static_cast<int>(q.dim(1)), kD, n_splits, part, out, lse, stream);
}

}  // namespace cpinfer::cuda
