// The producer side of the Hopper warp-specialized prefill attention (attention_ws.cu describes
// the kernel as a whole): its geometry and shared-memory layout and its parameters (which the host
// launcher uses too), the work items, and the producer warps' load of one K or V tile through the
// block table (TMA boxes where a chunk of keys lies inside the key range, cp.async with zero fill
// elsewhere; device code, compiled for sm_90a only). Included by attention_ws.cu alone.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda::attn_ws {

constexpr int kD = 128;
constexpr int kBM = 128;  // query rows per item: 2 consumer warpgroups x 64
constexpr int kBN = 128;  // keys per tile
constexpr int kThreads = 384;
constexpr int kQHalf = kBM * 128;   // bytes of one 64-column half of the Q tile
constexpr int kKVHalf = kBN * 128;  // bytes of one 64-column half of a K or V tile
constexpr int kQBytes = 2 * kQHalf;
constexpr int kKVBytes = 2 * kKVHalf;
constexpr int kOBytes = 64 * kD * 2;  // one consumer's output staging
// Shared memory of the kernel with kStages K/V buffers: Q, K[kStages], V[kStages], with two stages
// also the consumers' output staging, then the mbarriers q_full, q_empty, k_full[S], k_empty[S],
// v_full[S], v_empty[S], item_full[2], item_empty[2], the two item slots and the second pass's
// scheduler state.
template <int kStages>
struct Smem {
  static constexpr int kOffK = kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKVBytes;
  static constexpr int kOffO = kOffV + kStages * kKVBytes;
  static constexpr bool kStaged = kStages == 2;  // three stages leave no room to stage the output
  static constexpr int kOffBar = kOffO + (kStaged ? 2 * kOBytes : 0);
  static constexpr int kNumBars = 2 + 4 * kStages + 4;
  static constexpr int kOffItems = kOffBar + kNumBars * 8;
  // the two item slots and the second pass's scheduler state, + slack for the 1024-byte alignment
  static constexpr int kBytes = kOffItems + 3 * 16 + 1024;
};
static_assert(Smem<3>::kBytes <= 227 * 1024, "three K/V stages must fit the 227 KB a CTA may have");
constexpr int kBarSched = 1;  // named barriers 1, 2: the consumers' turns to issue GEMMs
constexpr int kBarEpi = 3;    // named barriers 3, 4: one consumer's epilogue
// 56·128 + 224·256 = 168·384, what the CTA is launched with (setmaxnreg moves registers between
// its warpgroups, it adds none): the producer warps spill below 56 (the second pass's scheduler 8
// bytes at 56; it runs only where the first pass flagged items), the consumers need no more than
// 224.
constexpr int kProducerRegs = 56, kConsumerRegs = 224;

struct WsParams {
  CUtensorMap tm_q, tm_k, tm_v;      // q [T, Hq, 128]; cache k/v [pages·block_size, Hkv, 128] in boxes of R rows
  CUtensorMap tm_k_tile, tm_v_tile;  // the same cache k/v in boxes of kBN rows (a tile on consecutive pages)
  const int32_t* blocks;
  const int32_t* block_table;
  const __nv_bfloat16* cache_k;
  const __nv_bfloat16* cache_v;
  __nv_bfloat16* out;
  float* lse;
  // [3]: items (or flag words) handed out, CTAs finished, items flagged for the second pass (all 0
  // between calls: the first two after each launch, the third after the second pass).
  int* sched;
  int n_blocks, max_blocks_per_seq, block_size, n_pages, hq, hkv;
  int tma_rows;     // R: keys per TMA box (0: every chunk by cp.async)
  int bs_shift;     // log2(block_size) where tma_rows > 0
  int group_heads;  // query heads per group of the item order (a multiple of hq / hkv dividing hq)
  float scale_log2;
  int flag_words;
  unsigned* flags;  // flag_words words: bit i = item i flagged by the first pass (0 between calls)
};

// The geometry of one work item: query rows [m0, m0 + rows) of a block, keys [key_lo, key_end)
// read as n_tiles tiles of kBN keys aligned to multiples of kBN, from tile t_lo up.
struct Item {
  int q_begin, m0, rows, pos_begin, seq, kv_begin, kv_bound, key_lo, key_end, t_lo, n_tiles;
};

__device__ __forceinline__ Item make_item(const int32_t* blk, int mtile) {
  Item t;
  t.q_begin = blk[0];
  const int q_len = blk[1];
  t.pos_begin = blk[2];
  t.seq = blk[3];
  t.kv_begin = blk[4];
  t.kv_bound = blk[5];
  t.m0 = mtile * kBM;
  t.rows = min(kBM, q_len - t.m0);
  t.key_end = min(t.kv_bound, t.pos_begin + t.m0 + t.rows);
  t.key_lo = min(t.kv_begin, t.key_end);
  t.t_lo = t.key_lo / kBN;
  t.n_tiles = t.key_end > t.key_lo ? (t.key_end - 1) / kBN - t.t_lo + 1 : 0;
  return t;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using namespace cpinfer::cuda::hopper;

// Byte offset of 16-byte chunk c (0..15) of row r in a 128-byte-swizzled tile of two halves.
__device__ __forceinline__ uint32_t sw_off(int r, int c, int half_bytes) {
  return static_cast<uint32_t>((c >> 3) * half_bytes + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

__device__ __forceinline__ int items_of(const int32_t* blocks, int b, int hq) {
  return (blocks[kDevAttnBlockFields * b + 1] + kBM - 1) / kBM * hq;
}

// The page of this lane's chunk of the tile at keys [k0, k0 + kBN) for the TMA path: lane c <
// kBN / R looks up chunk c when it lies wholly inside [key_lo, key_end) (0 otherwise, and for lanes
// without a chunk). The producer asks for the next tile's pages before it waits for a free buffer,
// so the table read is in flight while it waits: K and V of a tile share the pages, and a lookup
// on the issue path costs an L2 round trip per tile, which was what kept the consumers waiting
// for their K/V (Nsight Compute: 15% of the consumers' stall samples on the V-full barrier while
// the producer warp was almost never waiting for a free buffer).
__device__ __forceinline__ int tile_page(const WsParams& p, const int32_t* table, int k0, int key_lo, int key_end,
                                         int lane) {
  const int R = p.tma_rows;
  if (R == 0 || lane >= kBN / R) return 0;
  const int ck = k0 + lane * R;
  if (ck < key_lo || ck + R > key_end) return 0;
  return static_cast<int>(min(static_cast<unsigned>(table[ck >> p.bs_shift]), static_cast<unsigned>(p.n_pages - 1)));
}

// A producer warp's load of one K or V tile (keys [k0, k0 + kBN)) into `dst`, completing `full`
// (33 arrivals: the expect-tx of lane 0 and every lane's cp.async arrival). `page` is tile_page()'s
// answer for this tile. A tile whose chunks all lie in the key range on consecutive pages (a
// prompt's pages in a fresh cache) is one box of kBN rows per half (`tm_tile`), else a box per chunk.
__device__ __forceinline__ void load_kv_tile(const WsParams& p, const CUtensorMap* tm, const CUtensorMap* tm_tile,
                                             const __nv_bfloat16* cache, uint32_t dst, uint32_t full,
                                             const int32_t* table, int kvh, int k0, int key_lo, int key_end, int lane,
                                             int page) {
  const int R = p.tma_rows, bs = p.block_size;
  const int n_chunks = R > 0 ? kBN / R : 1;
  const int chunk_rows = R > 0 ? R : kBN;
  const uint32_t all = (1u << n_chunks) - 1u;
  // Chunks wholly inside [key_lo, key_end): one TMA box per half. Only tiles at an edge of the range
  // look at their chunks one by one (at small pages the per-chunk loops were the producer's time).
  uint32_t tma_mask = 0;
  if (R > 0 && k0 >= key_lo && k0 + kBN <= key_end) {
    tma_mask = all;
  } else if (R > 0) {
    for (int c = 0; c < n_chunks; ++c) {
      const int ck = k0 + c * R;
      if (ck >= key_lo && ck + R <= key_end) tma_mask |= 1u << c;
    }
  }
  if (lane == 0) mbar_arrive_expect_tx(full, static_cast<uint32_t>(__popc(tma_mask)) * 2u * R * 128u);
  __syncwarp();
  const int box_page = __shfl_sync(0xffffffffu, page, lane >> 1);  // lanes 2c, 2c + 1: chunk c
  // The tile is one run of kBN cache rows when chunk c's first row is chunk 0's + c·R.
  const int row = (page << p.bs_shift) + ((k0 + lane * R) & (bs - 1));  // lane c < n_chunks: chunk c's
  const int row0 = __shfl_sync(0xffffffffu, row, 0);
  const bool whole = R > 0 && tma_mask == all && __all_sync(0xffffffffu, lane >= n_chunks || row == row0 + lane * R);
  if (whole) {
    if (lane < 2) tma_load_3d(dst + lane * kKVHalf, tm_tile, full, lane * 64, kvh, row0);
  } else if (lane < 2 * n_chunks && ((tma_mask >> (lane >> 1)) & 1u)) {
    const int c = lane >> 1, half = lane & 1, ck = k0 + c * R;
    tma_load_3d(dst + half * kKVHalf + c * R * 128, tm, full, half * 64, kvh,
                (box_page << p.bs_shift) + (ck & (bs - 1)));
  }
  for (int c = 0; tma_mask != all && c < n_chunks; ++c) {
    if ((tma_mask >> c) & 1u) continue;
    for (int i = lane; i < chunk_rows * 16; i += 32) {
      const int r = c * chunk_rows + (i >> 4), ch = i & 15, key = k0 + r;
      const bool valid = key >= key_lo && key < key_end;
      int64_t off = 0;
      if (valid) {
        const unsigned page = min(static_cast<unsigned>(table[key / bs]), static_cast<unsigned>(p.n_pages - 1));
        off = ((static_cast<int64_t>(page) * bs + key % bs) * p.hkv + kvh) * kD + ch * 8;
      }
      cp_async16(dst + sw_off(r, ch, kKVHalf), cache + off, valid);
    }
  }
  mbar_arrive_cp_async(full);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace cpinfer::cuda::attn_ws
