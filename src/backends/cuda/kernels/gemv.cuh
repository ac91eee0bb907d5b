// Weight-streaming dot products for decode-sized GEMMs: a few activation rows against weight rows
// that are read once per step. Such a GEMM is bound by how many weight bytes are in flight: at
// ~1 µs per memory round trip, reading at the HBM's bandwidth needs megabytes outstanding, tens of
// kilobytes per SM. Plain loads do not get there: ptxas sinks each load to its first use, so an
// unrolled loop still waits once per 16-byte chunk. Here a warp copies a whole pass of its C weight
// rows (CH · 256 elements each) into its own shared-memory buffer with cp.async, waits once, and
// multiplies from shared memory: one round trip per pass. Lane l takes the 16-byte chunks j·32 + l
// (j < CH) of the pass, so each copy instruction of the warp reads 512 contiguous bytes and each lane
// reads back only what it copied itself. The block's activation rows (read by every warp) sit in
// shared memory too, copied by the whole block together with the first pass. Under programmatic
// dependent launch the first pass's weight copies are issued before the previous kernel has ended.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {

// acc += Σ of the eight products of two bf16x8 chunks, in fp32.
__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& b, float acc) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 → fp32 is a 16-bit shift: the low element is bits 0..15, the high one bits 16..31.
    acc = fmaf(__uint_as_float(av[i] << 16), __uint_as_float(bv[i] << 16), acc);
    acc = fmaf(__uint_as_float(av[i] & 0xffff0000u), __uint_as_float(bv[i] & 0xffff0000u), acc);
  }
  return acc;
}

// Copies the R rows x[r] of k bf16 (k % 8 == 0, 16-byte aligned) into xs [R][k / 8] with the whole
// block's threads; not committed or waited for.
template <int R>
__device__ __forceinline__ void copy_rows_async(uint4* xs, const __nv_bfloat16* const (&x)[R], int k) {
  const int kc = k / 8;
#pragma unroll
  for (int r = 0; r < R; ++r)
    for (int c = threadIdx.x; c < kc; c += blockDim.x) cp_async16(xs + r * kc + c, x[r] + c * 8, true);
}

// Shared memory of one warp's weight buffer, in 16-byte chunks.
template <int C, int CH>
__host__ __device__ constexpr int warp_dots_chunks() {
  return C * CH * 32;
}

// dot[r][c] += this lane's share of x[r] · w[c] over k elements (k % 8 == 0, 16-byte aligned rows).
// The first pass issues the weight copies, then waits for the previous kernel (pdl_wait: the weights
// are constant, the activation rows are not) and copies the R rows x[r] into xs [R][k / 8] with the
// whole block; its end is a block barrier, so every thread of the block must call this with the same
// k, and warps with active == false only take part in it. wbuf: this warp's
// warp_dots_chunks<C, CH>() chunks. Every w[c] and x[r] must be readable: callers with fewer columns
// or rows repeat the last one and ignore the extra sums.
template <int R, int C, int CH>
__device__ __forceinline__ void warp_dots(const __nv_bfloat16* const (&w)[C], const __nv_bfloat16* const (&x)[R],
                                          uint4* xs, int k, int lane, uint4* wbuf, bool active, float (&dot)[R][C]) {
  const int kc = k / 8;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int k0 = 0; k0 < kc; k0 += CH * 32) {
    if (active) {
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int ch = k0 + j * 32 + lane;
#pragma unroll
        for (int c = 0; c < C; ++c) cp_async16(wbuf + (c * CH + j) * 32 + lane, w[c] + ch * 8, ch < kc);
      }
    }
    if (k0 == 0) {
      pdl_wait();
      pdl_trigger();
      copy_rows_async(xs, x, k);
    }
    cp_async_commit();
    cp_async_wait<0>();
    if (k0 == 0) __syncthreads();
    if (!active) continue;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const int ch = k0 + j * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 xr = ch < kc ? xs[r * kc + min(ch, kc - 1)] : zero;  // past k: zero-filled weights
#pragma unroll
        for (int c = 0; c < C; ++c) dot[r][c] = dot8_bf16(wbuf[(c * CH + j) * 32 + lane], xr, dot[r][c]);
      }
    }
  }
}

}  // namespace cpinfer::cuda
