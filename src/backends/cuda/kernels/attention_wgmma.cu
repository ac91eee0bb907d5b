// Hopper (sm_90a) causal prefill: the same algorithm and contract as attention.cu (key ranges
// included: tiles from kv_begin, masks only where a tile crosses the diagonal or kv_end), with the
// two GEMMs on warpgroup MMA (wgmma) reading K and V straight from shared memory.
//
// One CTA = 128 query rows of one AttnBlock and one query head = 2 warpgroups of 64 rows. Q, K
// and V live in shared memory in the canonical 128-byte-swizzled layout that wgmma descriptors
// describe: each 128-column tile is stored as two 64-column halves, a half is rows of 128 bytes
// with 16-byte chunk c of row r at chunk c ^ (r % 8), tiles 1024-byte aligned.
//   S = Q·Kᵀ: wgmma m64n64k16, A = Q and B = K from shared memory (both K-major).
//   O += P·V: wgmma m64n128k16, A = P from registers (the S accumulators re-packed to bf16, whose
//            layout wgmma shares with mma.sync), B = V from shared memory (MN-major, transposed).
// K/V tiles of 64 keys arrive by cp.async, double-buffered, through the block table.
// Built only for sm_90a (its own target in CMakeLists.txt); elsewhere the launcher reports
// cudaErrorNotSupported and the back-end keeps the mma.sync kernel.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kD = 128;
constexpr int kBM = 128;  // query rows per CTA (2 warpgroups x 64)
constexpr int kBN = 64;   // keys per tile
constexpr int kThreads = 256;
constexpr int kQBytes = kBM * kD * 2;                         // 32 KB
constexpr int kKVBytes = kBN * kD * 2;                        // 16 KB per K or V tile
constexpr int kQHalf = kBM * 128;                             // bytes of one 64-column half of Q
constexpr int kKVHalf = kBN * 128;                            // bytes of one 64-column half of a K/V tile
constexpr size_t kSmemBytes = kQBytes + 4 * kKVBytes + 1024;  // + slack for 1024-byte alignment

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Byte offset of 16-byte chunk c (0..15) of row r in a swizzled tile whose halves are `half` bytes.
__device__ __forceinline__ uint32_t sw_off(int r, int c, int half) {
  return static_cast<uint32_t>((c >> 3) * half + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

using namespace cpinfer::cuda::hopper;
__device__ __forceinline__ void wgmma_wait0() { wgmma_wait<0>(); }

// s[32] (+)= Q[64 x 16] · K[64 x 16]ᵀ, both from shared memory.
__device__ __forceinline__ void wgmma_qk(float (&s)[32], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(s[0]), "+f"(s[1]), "+f"(s[2]), "+f"(s[3]), "+f"(s[4]), "+f"(s[5]), "+f"(s[6]), "+f"(s[7]), "+f"(s[8]),
        "+f"(s[9]), "+f"(s[10]), "+f"(s[11]), "+f"(s[12]), "+f"(s[13]), "+f"(s[14]), "+f"(s[15]), "+f"(s[16]),
        "+f"(s[17]), "+f"(s[18]), "+f"(s[19]), "+f"(s[20]), "+f"(s[21]), "+f"(s[22]), "+f"(s[23]), "+f"(s[24]),
        "+f"(s[25]), "+f"(s[26]), "+f"(s[27]), "+f"(s[28]), "+f"(s[29]), "+f"(s[30]), "+f"(s[31])
      : "l"(da), "l"(db), "r"(accumulate));
}

template <bool kPow2>
__device__ __forceinline__ void load_kv(uint32_t k_dst, uint32_t v_dst, const __nv_bfloat16* __restrict__ ck,
                                        const __nv_bfloat16* __restrict__ cv, const int32_t* __restrict__ table,
                                        int block_size, int bs_shift, int n_pages, int hkv, int kvh, int key0,
                                        int key_end) {
#pragma unroll
  for (int i = 0; i < kBN * 16 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx >> 4, c = idx & 15;
    const int key = key0 + r;
    const bool valid = key < key_end;
    int64_t off = 0;
    if (valid) {
      const int page = kPow2 ? table[key >> bs_shift] : table[key / block_size];
      const int in_page = kPow2 ? (key & (block_size - 1)) : key % block_size;
      const unsigned safe_page = min(static_cast<unsigned>(page), static_cast<unsigned>(n_pages - 1));
      off = ((static_cast<int64_t>(safe_page) * block_size + in_page) * hkv + kvh) * kD + c * 8;
    }
    const uint32_t so = sw_off(r, c, kKVHalf);
    cp_async16(k_dst + so, ck + off, valid);
    cp_async16(v_dst + so, cv + off, valid);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kPow2>
__global__ void __launch_bounds__(kThreads, 2)  // 128 registers, no spills (nvcc 13): two CTAs per SM
    attention_wgmma_kernel(const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ blocks,
                           const int32_t* __restrict__ block_table, int max_blocks_per_seq,
                           const __nv_bfloat16* __restrict__ cache_k, const __nv_bfloat16* __restrict__ cache_v,
                           int block_size, int bs_shift, int n_pages, int hq, int hkv, float scale_log2,
                           __nv_bfloat16* __restrict__ out, float* __restrict__ lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sq = base;
  auto k_stage = [&](int s) { return base + kQBytes + s * kKVBytes; };
  auto v_stage = [&](int s) { return base + kQBytes + (2 + s) * kKVBytes; };

  const int h = blockIdx.x;
  const int tile = gridDim.y - 1 - blockIdx.y;  // heaviest first
  const int32_t* blk = blocks + kDevAttnBlockFields * blockIdx.z;
  const int q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3], kv_bound = blk[5];
  const int m0 = tile * kBM;
  if (m0 >= q_len) return;
  const int rows = min(kBM, q_len - m0);
  const int key_end = min(kv_bound, pos_begin + m0 + rows);  // keys [key_lo, key_end), as in attention.cu
  const int key_lo = min(blk[4], key_end);
  const int kvh = h / (hq / hkv);
  const int32_t* table = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int64_t q_stride = static_cast<int64_t>(hq) * kD;
  const int wg = threadIdx.x >> 7;  // warpgroup: rows 64·wg ..
  const int warp_in_wg = (threadIdx.x >> 5) & 3;
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

#pragma unroll
  for (int i = 0; i < kBM * 16 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx >> 4, c = idx & 15;
    const bool valid = r < rows;
    const __nv_bfloat16* src = valid ? q + (q_begin + m0 + r) * q_stride + h * kD + c * 8 : q;
    cp_async16(sq + sw_off(r, c, kQHalf), src, valid);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  load_kv<kPow2>(k_stage(0), v_stage(0), cache_k, cache_v, table, block_size, bs_shift, n_pages, hkv, kvh, key_lo,
                 key_end);
  asm volatile("cp.async.commit_group;\n" ::);

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};
  const int row0 = wg * 64 + warp_in_wg * 16 + g;  // this thread's rows: row0, row0 + 8
  const int qpos0 = pos_begin + m0 + row0;
  const int wg_last_pos = pos_begin + m0 + wg * 64 + 63;
  const int unmasked_end = min(kv_bound, pos_begin + m0 + 1);  // every row sees the keys before this
  const int n_tiles = (key_end - key_lo + kBN - 1) / kBN;
  for (int j = 0; j < n_tiles; ++j) {
    const int st = j & 1;
    const int key0 = key_lo + j * kBN;
    if (j + 1 < n_tiles)
      load_kv<kPow2>(k_stage(st ^ 1), v_stage(st ^ 1), cache_k, cache_v, table, block_size, bs_shift, n_pages, hkv, kvh,
                     key0 + kBN, key_end);
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 1;\n" ::);
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (key0 <= wg_last_pos) {  // uniform over the warpgroup
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.0f;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint32_t koff = (ks & 3) << 5;  // 16 columns = 32 bytes into the swizzle atom
        const uint64_t da = make_desc(sq + (ks >> 2) * kQHalf + wg * 64 * 128 + koff, 16, 1024);
        const uint64_t db = make_desc(k_stage(st) + (ks >> 2) * kKVHalf + koff, 16, 1024);
        wgmma_qk(s, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait0();
      fence_regs(s);
      // s[4n + e]: row row0 + 8·(e >> 1), key key0 + 8n + 2·t4 + (e & 1).
      if (key0 + kBN > unmasked_end) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + n * 8 + 2 * t4 + (e & 1);
            const int qpos = qpos0 + (e >> 1) * 8;
            if (key > qpos || key >= kv_bound) s[4 * n + e] = -INFINITY;
          }
      }
      float corr[2];
      bool grew = false;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_row[r], mx * scale_log2);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        grew |= m_new != m_row[r];
        corr[r] = fast_exp2(m_row[r] - m_use);
        m_row[r] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          s[4 * n + 2 * r] = fast_exp2(fmaf(s[4 * n + 2 * r], scale_log2, -m_use));
          s[4 * n + 2 * r + 1] = fast_exp2(fmaf(s[4 * n + 2 * r + 1], scale_log2, -m_use));
          sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
        }
        l_row[r] = l_row[r] * corr[r] + sum;
      }
      if (__any_sync(0xffffffffu, grew)) {
        scale_rows(o, corr);
      }
      uint32_t pa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        // Keys 16kk..16kk+15 = two 8-row groups (stride 1024 B); d halves 8 KB apart.
        const uint64_t db = make_desc(v_stage(st) + kk * 16 * 128, kKVHalf, 1024);
        wgmma_m64n128_rs(o, pa[kk], db);
      }
      wgmma_commit();
      wgmma_wait0();
      fence_regs(o);
    }
    __syncthreads();
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_row[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row0 + 8 * r;
    if (row >= rows) continue;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;  // no key in range: out 0, lse -inf
    const int64_t tok = q_begin + m0 + row;
    __nv_bfloat16* orow = out + tok * q_stride + h * kD;
#pragma unroll
    for (int n = 0; n < 16; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t4) =
          pack_bf16(o[4 * n + 2 * r] * inv_l, o[4 * n + 2 * r + 1] * inv_l);
    if (lse != nullptr && t4 == 0) lse[tok * hq + h] = (m_row[r] + log2f(l)) * 0.69314718055994531f;
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace

cudaError_t launch_attention_wgmma(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
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
  auto kernel = bs_shift >= 0 ? attention_wgmma_kernel<true> : attention_wgmma_kernel<false>;
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
