// Decode attention (one query row per block), head_dim 128, BF16 q and cache: one CTA per
// (block, KV head, key split) serves all G query heads that share the KV head, so each K/V row
// is read from memory once per step, not G times. K and V arrive in tiles of 64 keys by 16-byte
// cp.async into swizzled shared memory (zero fill outside the key range), double-buffered so that
// the next tile's loads are in flight while this one is used: the kernel is bound by the bandwidth
// of the cache reads, as decode is.
//
// The arithmetic runs on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), as in the
// prefill kernel (attention.cu) with the G heads as the 16 query rows (rows >= G are zero): each of
// the 4 warps takes 16 keys of every tile, S = Q·Kᵀ for them, its own online softmax (m, l) and
// O += P·V with P re-packed from the S accumulators. At the end the warps' (m, l, O) are merged by
// log-sum-exp in shared memory; a split writes its partial (acc, max, sum), which attention_merge.cu's
// split merge (kD threads per (block, head)) combines. Each block's key range is cut on the device
// into n_splits runs of equal length (whole 64-key tiles), so a split count sized for a longer
// context (a captured decode graph's, for the longest context it serves) still spreads a block's
// keys over every split. The page of each key is looked up once, when its tile is loaded; a key
// whose table entry lies outside the cache is skipped (masked), never read.
#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;        // keys per tile (16 per warp)
constexpr int kStages = 3;       // two tiles in flight while one is used
constexpr int kD = 128;          // head_dim
constexpr int kChunks = kD / 8;  // 16-byte chunks per row
constexpr int kMaxG = 16;        // query heads per KV head (the MMA's 16 rows)
constexpr float kLn2 = 0.69314718055994531f;

// Shared memory: Q [16][kD] and kStages x (K, V) [kTile][kD] BF16, swizzled; the tiles' key masks.
// After the key loop the K/V region holds the warps' partial results for the merge.
constexpr size_t kQBytes = size_t{kMaxG} * kD * 2;
constexpr size_t kTileBytes = size_t{kTile} * kD * 2;
constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kTileBytes + size_t{kStages} * kTile;
static_assert(size_t{kWarps} * kMaxG * (kD + 2) * sizeof(float) <= 2 * kStages * kTileBytes,
              "the warps' partials must fit the K/V tiles");

// Element offset of (row, 16-byte chunk) with the XOR swizzle that keeps ldmatrix and cp.async
// free of bank conflicts.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kD + ((chunk ^ (row & 7)) << 3); }

__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ blocks,
                            const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                            const __nv_bfloat16* __restrict__ cache_k, const __nv_bfloat16* __restrict__ cache_v,
                            int block_size, int bs_shift, int n_pages, int hq, int hkv, int n_group, float scale_log2,
                            int n_splits, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                            float* __restrict__ part) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ __align__(128) unsigned char smem[];
  auto* sq = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sk = sq + kMaxG * kD;                                         // [kStages][kTile][kD]
  __nv_bfloat16* sv = sk + kStages * kTile * kD;                               // [kStages][kTile][kD]
  auto* svalid = reinterpret_cast<unsigned char*>(sv + kStages * kTile * kD);  // [kStages][kTile]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int32_t* blk = blocks + kDevAttnBlockFields * blockIdx.z;
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3];
  if (q_len < 1) return;
  // Keys [key_lo, key_hi) (an empty range stays empty); this split takes the split-th run of
  // split_len of them.
  const int key_hi = min(blk[5], pos_begin + 1);
  const int key_lo = min(blk[4], key_hi);
  const int split_len = ((key_hi - key_lo + n_splits - 1) / n_splits + kTile - 1) / kTile * kTile;
  const int64_t kb = static_cast<int64_t>(key_lo) + static_cast<int64_t>(split) * split_len;
  const int key_begin = static_cast<int>(kb < key_hi ? kb : key_hi);
  const int key_end = static_cast<int>(kb + split_len < key_hi ? kb + split_len : key_hi);
  const int32_t* table = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int64_t row = q_begin;
  const int h0 = kvh * n_group;

  // Q: the group's heads as rows 0..G-1, zero rows after.
  for (int c = tid; c < kMaxG * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    cp_async16(sq + swz(r, ch), q + ((row * hq + h0 + (r < n_group ? r : 0)) * kD + ch * 8), r < n_group);
  }
  const int n_tiles = (key_end - key_begin + kTile - 1) / kTile;
  // Thread tid loads chunk tid % 16 of rows tid / 16 + 8i; the row's page is looked up once.
  auto load_tile = [&](int tile, int stage) {
    __nv_bfloat16* dk = sk + stage * kTile * kD;
    __nv_bfloat16* dv = sv + stage * kTile * kD;
    const int ch = tid % kChunks;
#pragma unroll
    for (int i = 0; i < kTile * kChunks / kThreads; ++i) {
      const int r = tid / kChunks + i * (kThreads / kChunks);
      const int key = key_begin + tile * kTile + r;
      int64_t slot = -1;
      if (key < key_end) {
        // Page sizes that are powers of two (all the engine uses) shift instead of dividing.
        const int blk_i = bs_shift >= 0 ? key >> bs_shift : key / block_size;
        const int page = table[blk_i];
        if (static_cast<unsigned>(page) < static_cast<unsigned>(n_pages))
          slot = static_cast<int64_t>(page) * block_size + (key - blk_i * block_size);
      }
      const int64_t base = slot >= 0 ? (slot * hkv + kvh) * kD + ch * 8 : 0;
      cp_async16(dk + swz(r, ch), cache_k + base, slot >= 0);
      cp_async16(dv + swz(r, ch), cache_v + base, slot >= 0);
      if (ch == 0) svalid[stage * kTile + r] = slot >= 0;
    }
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_tiles) load_tile(st, st);
    cp_async_commit();  // the first group also holds Q
  }

  const int g = lane >> 2, t4 = lane & 3;  // accumulator row (head) g and g + 8, key/dim pair 2·t4
  float o[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};
  uint32_t qa[kD / 16][4];

  for (int t = 0; t < n_tiles; ++t) {
    if (t + kStages - 1 < n_tiles) load_tile(t + kStages - 1, (t + kStages - 1) % kStages);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();  // tile t (and on the first pass Q) visible to every thread
    if (t == 0) {
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) ldmatrix_x4(qa[ks], sq + swz(lane & 15, ks * 2 + (lane >> 4)));
    }
    const int stage = t % kStages;
    const __nv_bfloat16* kt = sk + stage * kTile * kD;
    const __nv_bfloat16* vt = sv + stage * kTile * kD;
    const int k0 = warp * 16;  // this warp's keys of the tile

    // S = Q·Kᵀ for the warp's 16 keys: two n8 tiles.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t b[4];
      ldmatrix_x4(b, kt + swz(k0 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
      mma_bf16(s[0], qa[ks], b[0], b[1]);
      mma_bf16(s[1], qa[ks], b[2], b[3]);
    }
    // Keys outside the range or the cache were zero-filled: mask them.
    const unsigned char* valid = svalid + stage * kTile + k0;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!valid[n * 8 + 2 * t4 + (e & 1)]) s[n][e] = -INFINITY;

          // Online softmax per row (head), spread over the 4 threads of a quad; max in log2 units.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_row[r], mx * scale_log2);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key yet
      const float corr = fast_exp2(m_row[r] - m_use);
      m_row[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        s[n][2 * r] = fast_exp2(fmaf(s[n][2 * r], scale_log2, -m_use));
        s[n][2 * r + 1] = fast_exp2(fmaf(s[n][2 * r + 1], scale_log2, -m_use));
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l_row[r] = l_row[r] * corr + sum;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
    }
    // O += P·V over the warp's 16 keys.
    uint32_t pa[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]), pack_bf16(s[1][0], s[1][1]),
                      pack_bf16(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, vt + swz(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)));
      mma_bf16(o[2 * dp], pa, b[0], b[1]);
      mma_bf16(o[2 * dp + 1], pa, b[2], b[3]);
    }
    __syncthreads();  // every warp is done with this stage before it is loaded again
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps: warp w's rows go to red[w][row][0..kD) = O, [kD] = m, [kD + 1] = l.
  auto* red = reinterpret_cast<float*>(sk);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_row[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int hr = g + 8 * r;
    if (hr >= n_group) continue;
    float* dst = red + (warp * kMaxG + hr) * (kD + 2);
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      dst[n * 8 + 2 * t4] = o[n][2 * r];
      dst[n * 8 + 2 * t4 + 1] = o[n][2 * r + 1];
    }
    if (t4 == 0) {
      dst[kD] = m_row[r];
      dst[kD + 1] = l;
    }
  }
  __syncthreads();
  for (int i = tid; i < n_group * kD; i += kThreads) {
    const int hr = i / kD, d = i % kD;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red[(w * kMaxG + hr) * (kD + 2) + kD]);
    float acc = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* src = red + (w * kMaxG + hr) * (kD + 2);
      const float wt = src[kD] == -INFINITY ? 0.0f : fast_exp2(src[kD] - m);
      acc += src[d] * wt;
      l += src[kD + 1] * wt;
    }
    const int h = h0 + hr;
    if (n_splits > 1) {  // partial result; an empty split leaves m = -inf, l = 0
      float* p = part + ((row * hq + h) * n_splits + split) * (kD + 2);
      p[d] = acc;
      if (d == 0) {
        p[kD] = m;
        p[kD + 1] = l;
      }
    } else {
      out[(row * hq + h) * kD + d] = __float2bfloat16_rn(l > 0.0f ? acc / l : 0.0f);
      if (lse != nullptr && d == 0) lse[row * hq + h] = (m + log2f(l)) * kLn2;
    }
  }
}

cudaError_t launch_kernel(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale_log2,
                          DevTensor out, float* lse, int n_splits, float* part, cudaStream_t stream) {
  static_assert(kSmemBytes <= 227 * 1024, "decode attention tiles exceed shared memory");
  const int hkv = static_cast<int>(cache.k.dim(2));
  const int hq = static_cast<int>(q.dim(1));
  const dim3 grid(static_cast<unsigned>(n_splits), static_cast<unsigned>(hkv), static_cast<unsigned>(batch.n_blocks));
  const int bs = cache.block_size();
  int bs_shift = (bs & (bs - 1)) == 0 ? 0 : -1;
  while (bs_shift >= 0 && (1 << bs_shift) < bs) ++bs_shift;
  return launch_k(attention_decode_kernel, grid, kThreads, kSmemBytes, stream, q.ptr<const __nv_bfloat16>(),
                  batch.blocks, batch.block_table, batch.max_blocks_per_seq, cache.k.ptr<const __nv_bfloat16>(),
                  cache.v.ptr<const __nv_bfloat16>(), cache.block_size(), bs_shift, static_cast<int>(cache.k.dim(0)),
                  hq, hkv, hq / hkv, scale_log2, n_splits, out.ptr<__nv_bfloat16>(), lse, part);
}

}  // namespace

bool attention_decode_supported(const DevTensor& q, const DevKv& cache, int max_q_len) {
  if (max_q_len != 1 || q.dtype != DType::BF16 || cache.k.dtype != DType::BF16 || q.ndim != 3 || q.dim(2) != kD)
    return false;
  const int64_t hq = q.dim(1), hkv = cache.k.dim(2);
  if (hkv <= 0 || hq % hkv != 0) return false;
  const int64_t g = hq / hkv;
  return g >= 1 && g <= kMaxG && aligned16(q.data) && aligned16(cache.k.data) && aligned16(cache.v.data);
}

int attention_decode_splits(int n_blocks, int hkv, int max_keys, int n_sms) {
  // About two CTAs per SM in all, and at least two tiles (128 keys) per split; at most 64 splits.
  const int64_t ctas = static_cast<int64_t>(n_blocks) * hkv;
  if (ctas <= 0) return 1;
  const int64_t by_work = (2 * static_cast<int64_t>(n_sms) + ctas - 1) / ctas;
  const int64_t by_keys = (static_cast<int64_t>(max_keys) + 2 * kTile - 1) / (2 * kTile);
  const int64_t s = std::min<int64_t>(std::min(by_work, by_keys), kAttnMaxSplits);
  return static_cast<int>(s < 1 ? 1 : s);
}

cudaError_t launch_attention_decode(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                    DevTensor out, DevTensor lse, int n_splits, float* part, cudaStream_t stream) {
  if (batch.n_blocks == 0 || batch.max_q_len == 0) return cudaSuccess;
  if (!attention_decode_supported(q, cache, batch.max_q_len) || n_splits < 1 || n_splits > kAttnMaxSplits ||
      batch.n_blocks > 65535 || (n_splits > 1 && part == nullptr))
    return cudaErrorInvalidValue;
  const float scale_log2 = scale * 1.4426950408889634f;
  float* lse_p = lse.defined() ? lse.ptr<float>() : nullptr;
  const cudaError_t err = launch_kernel(q, batch, cache, scale_log2, out, lse_p, n_splits, part, stream);
  if (err != cudaSuccess || n_splits == 1) return err;
  return launch_attention_split_merge(batch, static_cast<int>(q.dim(1)), kD, n_splits, part, out, lse, stream);
}

}  // namespace cpinfer::cuda
