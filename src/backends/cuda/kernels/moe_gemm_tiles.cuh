// What the Hopper grouped MoE GEMMs (moe_gemm_wgmma.cu: BF16; moe_gemm_fp8_wgmma.cu: FP8) share:
// the tile geometry, the epilogue, and the producer warpgroup and mbarrier ring of their
// warp-specialized kernels. Both operand types are 128-byte tile rows (64 bf16 or 128 e4m3 values
// of K), so everything here works in bytes and is the same for both:
// - tiles: rows of 128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8) (the 128-byte
//   swizzle of the wgmma descriptors, SBO = 1024), every tile 1024-byte aligned; an A tile is the
//   kMoeGemmTileM (128) rows of one M-tile, a B tile kBN weight rows (gate‖up: kBN / 2 gate rows
//   n0.., then the same up rows, so accumulator columns c and c + kBN / 2 are g and u of output
//   n0 + c in one thread);
// - accumulators: d[4n + e] of a warpgroup's m64nN wgmma is row 16·warp + lane/4 + 8·(e/2) of its
//   64, column 8n + 2·(lane%4) + e%2 (acc_row / acc_col with the 256 threads of two warpgroups);
// - the persistent item walk (ws_for_each_item) and the mbarrier ring (WsRing) of the
//   warp-specialized kernels (each has its own producer loop).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda::moe_tiles {

constexpr int kTileM = kMoeGemmTileM;        // 128 rows per M-tile
constexpr int kRowBytes = 128;               // one tile row: one k-step of K
constexpr int kABytes = kTileM * kRowBytes;  // 16 KB

// The kernels whose 256 threads all load: thread tid copies 16-byte chunk load_chunk(tid) of tile
// rows load_row(tid, i), 32 rows a pass.
constexpr int kRowsPerPass = 32;
__host__ __device__ constexpr int load_row(int tid, int i) { return (tid >> 3) + kRowsPerPass * i; }
__host__ __device__ constexpr int load_chunk(int tid) { return tid & 7; }
// Byte offset of chunk c of row r inside a 1024-aligned tile of 128-byte rows, 128-byte swizzle.
__host__ __device__ constexpr uint32_t swizzled_off(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
}
// Gate‖up B tile row r holds gate (false) or up (true) row n0 + gateup_row(r, bn).
__host__ __device__ constexpr bool gateup_is_up(int r, int bn) { return r >= bn / 2; }
__host__ __device__ constexpr int gateup_row(int r, int bn) { return r & (bn / 2 - 1); }
// Byte offsets from the slot of warpgroup wg's A operand and of the B operand, the 32-byte K step
// ks inside the 128-byte rows (k16 for bf16, k32 for e4m3).
__host__ __device__ constexpr uint32_t desc_a_off(int wg, int ks) {
  return static_cast<uint32_t>(wg * 64 * kRowBytes + ks * 32);
}
__host__ __device__ constexpr uint32_t desc_b_off(int ks) { return static_cast<uint32_t>(kABytes + ks * 32); }
// Accumulator idx of thread tid (0..255 over two MMA warpgroups): row in the 128-row tile and
// column in the B tile.
__host__ __device__ constexpr int acc_row(int tid, int idx) {
  return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2) + 8 * ((idx & 3) >> 1);
}
__host__ __device__ constexpr int acc_col(int tid, int idx) { return 8 * (idx >> 2) + 2 * (tid & 3) + (idx & 1); }

// Where a tile's results go: gate‖up: act [rows, n_out] BF16 = silu(bf16(g)) · bf16(u) rounded to
// BF16; down: y [rows, n_out] in F32, or BF16 where out_bf16.
struct TileOut {
  void* out;
  int n_out;
  bool out_bf16;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// The two BF16 values of bf16x2_bits' word as floats.
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// A quad (the 4 threads of an accumulator row) holds 32 consecutive columns of the row as 4 bf16
// pairs per thread: thread q has columns 8m + 2q, +1 of n8-tile m in w[m]. Two butterfly rounds
// (exchange halves across q ^ 2, then pairs across q ^ 1) leave thread q with n8-tile q's 8 columns
// in order, so each thread writes 16 contiguous bytes and a warp 64 bytes per row (the pairs as
// they come would be 4-byte stores, a 32-byte sector split over two instructions).
__device__ __forceinline__ uint4 quad_transpose(uint32_t (&w)[4], int q) {
  const bool b1 = (q & 2) != 0, b0 = (q & 1) != 0;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const uint32_t r = __shfl_xor_sync(0xffffffffu, b1 ? w[m] : w[m + 2], 2);
    if (b1)
      w[m] = r;
    else
      w[m + 2] = r;
  }
#pragma unroll
  for (int m = 0; m < 4; m += 2) {
    const uint32_t r = __shfl_xor_sync(0xffffffffu, b0 ? w[m] : w[m + 1], 1);
    if (b0)
      w[m] = r;
    else
      w[m + 1] = r;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Gate‖up's act values, bf16(silu(bf16 g) · bf16 u), of accumulator row acc_row(tid, 2h) in output
// n8-tiles 4g..4g+3 (the up value of a column is kBN / 4 accumulators on), quad-transposed: thread
// q gets n8-tile 4g + q's 8 columns in order.
template <int kBN>
__device__ __forceinline__ uint4 gateup_act8(const float (&acc)[kBN / 2], int h, int g, int q) {
  uint32_t w[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int idx = 4 * (4 * g + m) + 2 * h;
    // g and u rounded to BF16 a pair per cvt.rn.bf16x2.f32 and unpacked: the values one rounding
    // each gives, with half the conversion instructions (which, with SiLU's MUFU, held 31% of the
    // FP8 gate‖up epilogue's samples; docs/benchmarks.md, 2026-12-06 18:59).
    const uint32_t gb = bf16x2_bits(acc[idx], acc[idx + 1]),
                   ub = bf16x2_bits(acc[idx + kBN / 4], acc[idx + 1 + kBN / 4]);
    w[m] = bf16x2_bits(silu_mul(bf16_lo(gb), bf16_lo(ub)), silu_mul(bf16_hi(gb), bf16_hi(ub)));
  }
  return quad_transpose(w, q);
}

// The epilogue of one tile straight from the accumulators: acc[idx] is tile row acc_row(tid, idx),
// B column acc_col(tid, idx); tile rows from rows_left on are not written; row0 is the tile's first
// row in the expert-sorted rows, n0 its first output column. BF16 outputs go out as 16-byte stores
// of 8 columns (quad_transpose; every lane of the warp takes part, written or not); n_out is a
// multiple of 64, so an 8-column chunk is inside or outside.
template <bool kGateUp, int kBN>
__device__ __forceinline__ void store_tile(const float (&acc)[kBN / 2], const TileOut& o, int tid, int rows_left,
                                           int64_t row0, int n0) {
  const int n_out = o.n_out, q = tid & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = acc_row(tid, 2 * h);
    const int64_t row = row0 + r;
    if (kGateUp || o.out_bf16) {
      auto* out = static_cast<__nv_bfloat16*>(o.out) + row * n_out;
      constexpr int kTiles = kGateUp ? kBN / 16 : kBN / 8;  // output n8-tiles (gate‖up: gate's)
      static_assert(kTiles % 4 == 0, "whole quads of n8-tiles");
#pragma unroll
      for (int g = 0; g < kTiles / 4; ++g) {
        uint4 v;
        if constexpr (kGateUp) {
          v = gateup_act8<kBN>(acc, h, g, q);
        } else {
          uint32_t w[4];
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int idx = 4 * (4 * g + m) + 2 * h;
            w[m] = bf16x2_bits(acc[idx], acc[idx + 1]);
          }
          v = quad_transpose(w, q);
        }
        const int col = n0 + 8 * (4 * g + q);
        if (r < rows_left && col < n_out) *reinterpret_cast<uint4*>(out + col) = v;
      }
    } else {
      if (r >= rows_left) continue;
      float* out = static_cast<float*>(o.out) + row * n_out;
#pragma unroll
      for (int n = 0; n < kBN / 8; ++n) {
        const int idx = 4 * n + 2 * h;
        const int col = n0 + acc_col(tid, idx);
        if (col < n_out) *reinterpret_cast<float2*>(out + col) = make_float2(acc[idx], acc[idx + 1]);
      }
    }
  }
}

// ---- warp-specialized kernels: warpgroup 0 produces, the others multiply.

// The ring's 2·kStages mbarriers at `bars`: full(s) completes when the producer's 128 threads have
// their copies of slot s landed; empty(s) when the consumers' `releases` arrivals say it is free.
template <int kStages>
struct WsRing {
  uint32_t bars;
  __device__ uint32_t full(int s) const { return bars + 8 * s; }
  __device__ uint32_t empty(int s) const { return bars + 8 * (kStages + s); }
  // Slot and phase parity of the it-th k-step the CTA loads (it counts on over N-tiles).
  __device__ static int slot(uint32_t it) { return static_cast<int>(it % kStages); }
  __device__ static uint32_t parity(uint32_t it) { return (it / kStages) & 1; }
  // By the whole CTA, before the roles split.
  __device__ void init(int releases) const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        hopper::mbar_init(full(s), 128);
        hopper::mbar_init(empty(s), releases);
      }
      hopper::mbar_init_fence();
    }
    __syncthreads();
  }
};

// moe_tile_of by a whole warp (every lane calls it with the same m_slot): the lanes read tile_start
// 32 entries at a time, independent loads, and count the entries e >= 1 with tile_start[e] <=
// m_slot, which is the expert (tile_start is non-decreasing from 0). A binary search is log2(count)
// dependent loads: in the FP8 down GEMM at 32K tokens (Nsight Compute) the MMA warps' search at
// each item's start drew ~9% of the kernel's warp samples.
__device__ __forceinline__ bool moe_tile_of_warp(const int32_t* __restrict__ tile_start,
                                                 const int32_t* __restrict__ offsets, int count, int m_slot,
                                                 MoeTile& t) {
  const int lane = threadIdx.x & 31;
  const int n_slots = __ldg(tile_start + count);
  int expert = 0;
#pragma unroll 4
  for (int e0 = 1; e0 < count; e0 += 32) {
    const int e = e0 + lane;
    expert += __popc(__ballot_sync(0xffffffffu, e < count && __ldg(tile_start + e) <= m_slot));
  }
  if (m_slot >= n_slots) return false;
  t = moe_tile_in(tile_start, offsets, expert, m_slot, kTileM);
  return true;
}

// The work of the persistent warp-specialized kernels: item i is (M-tile slot i / n_groups, group
// i % n_groups of n_per_cta N-tiles); CTA c takes items c, c + gridDim.x, ... and stops at the first
// slot past the last tile (slots are tile_start's order, so every later one is past it too). Each
// role of a CTA walks the same items, so the producer runs ahead into the next item while the MMA
// warpgroups write the last one (and the ring never drains between items). The host launches
// min(items, SMs) CTAs, or one CTA per item (MoeWgmmaConfig::persistent = false). kWarpWide: by
// whole warps, with moe_tile_of_warp (the FP8 kernels; the BF16 ws kernel keeps the binary search,
// with the warp-wide count it ran 6-8% slower at 32K tokens: H100, moe_bench, same call).
template <bool kWarpWide, class F>
__device__ __forceinline__ void ws_for_each_item(const int32_t* tile_start, const int32_t* offsets, int count,
                                                 int n_tiles, int n_per_cta, F&& f) {
  const int n_groups = (n_tiles + n_per_cta - 1) / n_per_cta;
  for (int i = blockIdx.x;; i += gridDim.x) {
    const int slot = i / n_groups, g = i - slot * n_groups;
    MoeTile tile;
    const bool found = kWarpWide ? moe_tile_of_warp(tile_start, offsets, count, slot, tile)
                                 : moe_tile_of(tile_start, offsets, count, slot, kTileM, tile);
    if (!found) return;
    const int j_begin = g * n_per_cta;
    f(tile, j_begin, min(j_begin + n_per_cta, n_tiles));
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace cpinfer::cuda::moe_tiles
