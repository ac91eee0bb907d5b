// FlashAttention-2-style causal prefill on tensor cores, head_dim 128, BF16, paged KV.
//
// One CTA = 128 query rows of one AttnBlock and one query head; 4 warps own 32 rows each (two
// m16 blocks share every K/V fragment read from shared memory, halving that traffic per FLOP),
// two CTAs per SM. K/V tiles of 64 keys are read through the block table (per-row addressing, so
// any block size works; shifts instead of divisions for power-of-two sizes) into swizzled shared
// memory with cp.async, double-buffered: tile j+1 streams in while tile j is used.
// S = Q·Kᵀ and O += P·V are mma.sync m16n8k16 (bf16 in, fp32 accumulate) fed by ldmatrix; the
// softmax is online in fp32 (log2 domain, ex2.approx), and O is rescaled only when a row max grew.
// Key tiles start at the block's kv_begin (so the diagonal part of a context-parallel block,
// kv_begin = pos_begin, lines up with its query tiles exactly as an ordinary prefill does) and
// stop at its causal frontier or kv_end; nothing outside the range is loaded, and only tiles that
// cross the diagonal or kv_end are masked. A warp whose 32 rows all precede a tile skips its math.
// The grid is (head, tile, block) with the heaviest (last) query tiles first so that the causal
// tail does not straggle.
//
// Measured (bench/attention_bench, H200, Hq 32 / Hkv 4, causal): 270 TFLOP/s at S = 4K, 302 at
// 16K, 310 at 32K. On Hopper the back-end runs attention_wgmma.cu instead (~1.45x, same output);
// this kernel serves other GPUs and is the reference that one is checked against.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {
namespace {

constexpr int kD = 128;
constexpr int kBM = 128;  // query rows per CTA
constexpr int kBN = 64;   // keys per tile
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = kBM / kWarps;  // 32: K/V fragments from shared memory serve 2 row blocks
constexpr int kMi = kRowsPerWarp / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kChunks = kD / 8;                                              // 16-byte chunks per row
constexpr size_t kSmemBytes = (kBM + 4 * kBN) * kD * sizeof(__nv_bfloat16);  // Q + 2 x (K, V)

// Shared-memory element offset of (row, 16-byte chunk) with the XOR swizzle that makes ldmatrix
// and cp.async conflict-free.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kD + ((chunk ^ (row & 7)) << 3); }

// Loads keys [key0, key0 + kBN) of kv head kvh into swizzled [kBN, kD] K and V tiles; keys at or
// past key_end are zero-filled without touching memory. A block-table entry outside [0, n_pages)
// is clamped into the cache: a corrupt table gives wrong numbers, never a fault. One slot computation
// serves K and V; a power-of-two block size (bs_shift >= 0) avoids the integer division.
template <bool kPow2>
__device__ __forceinline__ void load_kv_tiles(__nv_bfloat16* k_dst, __nv_bfloat16* v_dst,
                                              const __nv_bfloat16* __restrict__ cache_k,
                                              const __nv_bfloat16* __restrict__ cache_v,
                                              const int32_t* __restrict__ table, int block_size, int bs_shift,
                                              int n_pages, int hkv, int kvh, int key0, int key_end) {
#pragma unroll
  for (int i = 0; i < kBN * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int key = key0 + r;
    const bool valid = key < key_end;
    int64_t off = 0;
    if (valid) {
      const int page = kPow2 ? table[key >> bs_shift] : table[key / block_size];
      const int in_page = kPow2 ? (key & (block_size - 1)) : key % block_size;
      // Clamped into the cache (negative entries become huge unsigned): cheaper than a predicate.
      const unsigned safe_page = min(static_cast<unsigned>(page), static_cast<unsigned>(n_pages - 1));
      off = ((static_cast<int64_t>(safe_page) * block_size + in_page) * hkv + kvh) * kD + c * 8;
    }
    cp_async16(k_dst + swz(r, c), cache_k + off, valid);
    cp_async16(v_dst + swz(r, c), cache_v + off, valid);
  }
}

template <bool kPow2>
__global__ void __launch_bounds__(kThreads, 2)
    attention_flash_kernel(const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ blocks,
                           const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                           const __nv_bfloat16* __restrict__ cache_k, const __nv_bfloat16* __restrict__ cache_v,
                           int block_size, int bs_shift, int n_pages, int hq, int hkv, float scale_log2,
                           __nv_bfloat16* __restrict__ out, float* __restrict__ lse) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kBM, kD]
  // Stage s of K is sq + kBM·kD + s·kBN·kD, of V 2·kBN·kD further (computed, not indexed: an
  // array of stage pointers indexed at run time would live in local memory).
  auto k_stage = [&](int s) { return sq + (kBM + s * kBN) * kD; };
  auto v_stage = [&](int s) { return sq + (kBM + (2 + s) * kBN) * kD; };

  const int h = blockIdx.x;
  const int tile = gridDim.y - 1 - blockIdx.y;  // heaviest first
  const int32_t* blk = blocks + kDevAttnBlockFields * blockIdx.z;
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3], kv_bound = blk[5];
  const int m0 = tile * kBM;  // first query row of this CTA within the block
  if (m0 >= q_len) return;
  const int rows = min(kBM, q_len - m0);
  // Keys this CTA needs: [key_lo, key_end), in tiles from key_lo (clamped: an empty range stays
  // in bounds and runs no tile).
  const int key_end = min(kv_bound, pos_begin + m0 + rows);
  const int key_lo = min(blk[4], key_end);
  const int kvh = h / (hq / hkv);
  const int32_t* table = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t q_stride = static_cast<int64_t>(hq) * kD;  // elements between consecutive tokens

  // Q tile (rows past q_len zero-filled) and the first K/V tile.
#pragma unroll
  for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows;
    const __nv_bfloat16* src = valid ? q + (q_begin + m0 + r) * q_stride + h * kD + c * 8 : q;
    cp_async16(sq + swz(r, c), src, valid);
  }
  cp_async_commit();
  load_kv_tiles<kPow2>(k_stage(0), v_stage(0), cache_k, cache_v, table, block_size, bs_shift, n_pages, hkv, kvh, key_lo,
                       key_end);
  cp_async_commit();

  // Each warp owns kMi blocks of 16 rows; thread (g, t4) holds rows g and g + 8 of each.
  float o[kMi][kD / 8][4];
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi)
#pragma unroll
    for (int i = 0; i < kD / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.0f;
  float m_row[kMi][2], l_row[kMi][2];
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) m_row[mi][0] = m_row[mi][1] = -INFINITY, l_row[mi][0] = l_row[mi][1] = 0.0f;
  const int g = lane >> 2, t4 = lane & 3;
  const int warp_row0 = warp * kRowsPerWarp;
  const int qpos_base = pos_begin + m0 + warp_row0 + g;  // + mi·16 + r·8
  const int warp_last_pos = pos_begin + m0 + warp_row0 + kRowsPerWarp - 1;
  const int unmasked_end = min(kv_bound, pos_begin + m0 + 1);  // every row sees the keys before this
  int st = 0;
  for (int key0 = key_lo; key0 < key_end; key0 += kBN, st ^= 1) {
    if (key0 + kBN < key_end) {
      load_kv_tiles<kPow2>(k_stage(st ^ 1), v_stage(st ^ 1), cache_k, cache_v, table, block_size, bs_shift, n_pages,
                           hkv, kvh, key0 + kBN, key_end);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (key0 <= warp_last_pos) {  // else every row of this warp precedes the whole tile
      float s[kMi][kBN / 8][4];
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi)
#pragma unroll
        for (int n = 0; n < kBN / 8; ++n) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.0f;
      const __nv_bfloat16* kt = k_stage(st);
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        uint32_t qa[kMi][4];
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi)
          ldmatrix_x4(qa[mi], sq + swz(warp_row0 + mi * 16 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, kt + swz(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
          for (int mi = 0; mi < kMi; ++mi) {
            mma_bf16(s[mi][2 * np], qa[mi], b[0], b[1]);
            mma_bf16(s[mi][2 * np + 1], qa[mi], b[2], b[3]);
          }
        }
      }
      // Mask (only tiles that reach the diagonal or kv_end), on the raw scores. Keys past key_end
      // were zero-filled and are masked here too: they lie past the diagonal or kv_end.
      if (key0 + kBN > unmasked_end) {
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi)
#pragma unroll
          for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = key0 + n * 8 + 2 * t4 + (e & 1);
              const int qpos = qpos_base + mi * 16 + (e >> 1) * 8;
              if (key > qpos || key >= kv_bound) s[mi][n][e] = -INFINITY;
            }
      }
      // Online softmax per row (each row is spread over the 4 threads of a quad); the running max
      // is kept in log2 units, p = 2^(s·scale_log2 − m) is one FFMA and one MUFU.EX2. O is
      // rescaled only when some row of the warp saw its max grow (rare after the first tiles).
      float corr[kMi][2];
      bool grew = false;
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < kBN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mi][n][2 * r], s[mi][n][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m_row[mi][r], mx * scale_log2);
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // fully masked row so far
          grew |= m_new != m_row[mi][r];
          corr[mi][r] = fast_exp2(m_row[mi][r] - m_use);
          m_row[mi][r] = m_new;
          float sum = 0.0f;
#pragma unroll
          for (int n = 0; n < kBN / 8; ++n) {
            s[mi][n][2 * r] = fast_exp2(fmaf(s[mi][n][2 * r], scale_log2, -m_use));
            s[mi][n][2 * r + 1] = fast_exp2(fmaf(s[mi][n][2 * r + 1], scale_log2, -m_use));
            sum += s[mi][n][2 * r] + s[mi][n][2 * r + 1];
          }
          l_row[mi][r] = l_row[mi][r] * corr[mi][r] + sum;
        }
      }
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi)
#pragma unroll
          for (int n = 0; n < kD / 8; ++n) {
            o[mi][n][0] *= corr[mi][0];
            o[mi][n][1] *= corr[mi][0];
            o[mi][n][2] *= corr[mi][1];
            o[mi][n][3] *= corr[mi][1];
          }
      }
      // O += P · V, P re-packed from the S accumulators as bf16 A fragments.
      const __nv_bfloat16* vt = v_stage(st);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t pa[kMi][4];
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi) {
          pa[mi][0] = pack_bf16(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pa[mi][1] = pack_bf16(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pa[mi][2] = pack_bf16(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pa[mi][3] = pack_bf16(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vt + swz(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)));
#pragma unroll
          for (int mi = 0; mi < kMi; ++mi) {
            mma_bf16(o[mi][2 * dp], pa[mi], b[0], b[1]);
            mma_bf16(o[mi][2 * dp + 1], pa[mi], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration overwrites the stage just read
  }
  cp_async_wait<0>();

  // Normalize and store. Each row's sum is spread over its quad.
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_row[mi][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = warp_row0 + mi * 16 + g + 8 * r;
      if (row >= rows) continue;
      const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;  // no key in range: out 0, lse -inf
      const int64_t tok = q_begin + m0 + row;
      __nv_bfloat16* orow = out + tok * q_stride + h * kD;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t4) =
            pack_bf16(o[mi][n][2 * r] * inv_l, o[mi][n][2 * r + 1] * inv_l);
      if (lse != nullptr && t4 == 0) lse[tok * hq + h] = (m_row[mi][r] + log2f(l)) * 0.69314718055994531f;
    }
  }
}

}  // namespace

cudaError_t launch_attention_flash(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                   DevTensor out, DevTensor lse, cudaStream_t stream) {
  const int hq = static_cast<int>(q.dim(1));
  const int hkv = static_cast<int>(cache.k.dim(2));
  const int n_blocks = batch.n_blocks;
  const int max_q = batch.max_q_len;
  if (n_blocks == 0 || max_q == 0) return cudaSuccess;
  if (q.dim(2) != kD || n_blocks > 65535 || hq > 65535 || (max_q + kBM - 1) / kBM > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(hq), static_cast<unsigned>((max_q + kBM - 1) / kBM),
                  static_cast<unsigned>(n_blocks));
  const int bs = cache.block_size();
  const int bs_shift = (bs & (bs - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(bs)) : -1;
  auto kernel = bs_shift >= 0 ? attention_flash_kernel<true> : attention_flash_kernel<false>;
  const cudaError_t err = opt_in_dynamic_smem(kernel, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(q.ptr<const __nv_bfloat16>(), batch.blocks, batch.block_table,
                                                 batch.max_blocks_per_seq, cache.k.ptr<const __nv_bfloat16>(),
                                                 cache.v.ptr<const __nv_bfloat16>(), bs, bs_shift,
                                                 static_cast<int>(cache.k.dim(0)), hq, hkv, scale * 1.4426950408889634f,
                                                 out.ptr<__nv_bfloat16>(), lse.defined() ? lse.ptr<float>() : nullptr);
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
