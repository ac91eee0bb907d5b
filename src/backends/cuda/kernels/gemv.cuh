// Weight-streaming dot products for decode-sized GEMMs: a few activation rows against weight rows
// that are read once per step. Such a GEMM is bound by how many weight bytes are in flight: at
// ~1 µs per memory round trip, reading at the HBM's bandwidth needs megabytes outstanding, tens of
// kilobytes per SM. Plain loads do not get there: ptxas sinks each load to its first use, so an
// unrolled loop still waits once per 16-byte chunk. Here a warp copies a whole pass of its C weight
// rows (CH · 32 chunks of 16 bytes each) into its own shared-memory buffer with cp.async, waits
// once, and multiplies from shared memory: one round trip per pass. Lane l takes the 16-byte chunks
// j·32 + l (j < CH) of the pass, so each copy instruction of the warp reads 512 contiguous bytes and
// each lane reads back only what it copied itself. The block's activation rows (BF16, read by every
// warp) sit in shared memory too, copied by the whole block together with the first pass. Under
// programmatic dependent launch the first pass's weight copies are issued before the previous
// kernel has ended.
//
// Weight formats (what a 16-byte chunk holds): BF16 (8 weights) and FP8 (16 e4m3 codes, and one
// F32 scale per 128 x 128 block, copied with the pass).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8.cuh"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda {

// The low and high bf16 of a 32-bit word as fp32 (bf16 -> fp32 is a 16-bit shift).
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// acc += Σ of the eight products of two bf16x8 chunks, in fp32.
__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& b, float acc) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(bf16_lo(av[i]), bf16_lo(bv[i]), acc);
    acc = fmaf(bf16_hi(av[i]), bf16_hi(bv[i]), acc);
  }
  return acc;
}

// acc += (Σ of the sixteen products of the e4m3 codes in w with the bf16 elements of x[0] (codes
// 0..7) and x[1] (codes 8..15), in fp32) · scale. The codes are widened exactly (e4m3 -> half ->
// fp32), so each product is exact and only the sums and the scaling round.
__device__ __forceinline__ float dot16_e4m3(const uint4& w, const uint4 (&x)[2], float scale, float acc) {
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  const uint32_t xv[8] = {x[0].x, x[0].y, x[0].z, x[0].w, x[1].x, x[1].y, x[1].z, x[1].w};
  float part[2] = {0.0f, 0.0f};  // codes 0..7 and 8..15: two independent chains
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = fp8x2_to_f32(static_cast<uint16_t>(wv[i] & 0xffffu));  // codes 4i, 4i + 1
    const float2 hi = fp8x2_to_f32(static_cast<uint16_t>(wv[i] >> 16));      // codes 4i + 2, 4i + 3
    float& p = part[i >> 1];
    p = fmaf(lo.x, bf16_lo(xv[2 * i]), p);
    p = fmaf(lo.y, bf16_hi(xv[2 * i]), p);
    p = fmaf(hi.x, bf16_lo(xv[2 * i + 1]), p);
    p = fmaf(hi.y, bf16_hi(xv[2 * i + 1]), p);
  }
  return fmaf(part[0] + part[1], scale, acc);
}

// The weight formats of warp_dots, by what one 16-byte chunk of a weight row holds; weight(row,
// scale_row, k) is element k of a row as fp32 (for code paths off the chunks).
// BF16: 8 weights.
struct Bf16Weights {
  static constexpr int kPerChunk = 8;
  static constexpr bool kScaled = false;
  __device__ static float dot(const uint4& w, const uint4 (&x)[1], float, float acc) { return dot8_bf16(w, x[0], acc); }
  __device__ static float weight(const void* row, const float*, int k) {
    return to_f32(static_cast<const __nv_bfloat16*>(row)[k]);
  }
};
// FP8 (ops/backend.h Weight): 16 e4m3 codes, W = code · scale of its 128 x 128 block. The 16 codes
// of a chunk lie in one block (16 divides 128), so the block's scale multiplies their partial dot
// product once (dot16_e4m3); it changes every 8 chunks. weight(): code · scale rounded once (the CPU
// reference's value).
struct Fp8Weights {
  static constexpr int kPerChunk = 16;
  static constexpr bool kScaled = true;
  __device__ static float dot(const uint4& w, const uint4 (&x)[2], float scale, float acc) {
    return dot16_e4m3(w, x, scale, acc);
  }
  __device__ static float weight(const void* row, const float* scale_row, int k) {
    return fp8x2_to_f32(static_cast<const uint8_t*>(row)[k]).x * __ldg(scale_row + k / kFp8Blk);
  }
};

// C weight rows of k weights: their starts (16-byte aligned for warp_dots) and, for a scaled
// format, each row's block scales (the [ceil(k / 128)] F32 of its 128-row block).
template <int C>
struct WeightRows {
  const void* w[C];
  const float* scale[C];
  // Slot i: row n of the [N, k] weight at `base` in format F, with its scales from `scales`
  // [ceil(N / 128), ceil(k / 128)] (unused when F is not scaled).
  template <class F>
  __device__ __forceinline__ void set(int i, const void* base, const float* scales, int64_t n, int k) {
    w[i] = static_cast<const unsigned char*>(base) + n * k * (16 / F::kPerChunk);
    scale[i] = F::kScaled ? scales + (n / kFp8Blk) * ((k + kFp8Blk - 1) / kFp8Blk) : nullptr;
  }
};

// Copies the R rows x[r] of k bf16 (k % (8 · kX) == 0, 16-byte aligned) into xs [R][k / 8] with the
// whole block's threads; not committed or waited for. A weight chunk meets kX chunks of x; within a
// row, x chunk c goes to (c % kX) · k / (8 · kX) + c / kX, so that the lanes of a warp, which take
// consecutive weight chunks, read consecutive x chunks (no bank conflicts).
template <int R, int kX>
__device__ __forceinline__ void copy_rows_async(uint4* xs, const __nv_bfloat16* const (&x)[R], int k) {
  const int kc = k / 8, per = kc / kX;
#pragma unroll
  for (int r = 0; r < R; ++r)
    for (int c = threadIdx.x; c < kc; c += blockDim.x)
      cp_async16(xs + r * kc + (c % kX) * per + c / kX, x[r] + c * 8, true);
}

// A pass of CH · 32 chunks spans CH · 4 blocks of 128 codes: the scales of blocks b0 .. b0 + CH · 4
// of the C rows into sbuf [C][CH · 4] (zero past a row's kb blocks), copied by the warp's lanes.
template <int C, int CH>
__device__ __forceinline__ void copy_pass_scales(const float* const (&scale)[C], float* sbuf, int b0, int kb,
                                                 int lane) {
  constexpr int kPer = CH * 4;
#pragma unroll
  for (int i0 = 0; i0 < C * kPer; i0 += 32) {
    const int i = i0 + lane;
    if (i >= C * kPer) break;
    const int c = i / kPer, b = b0 + i % kPer;
    const float* row = scale[0];  // constant indices: the row pointers stay in registers
#pragma unroll
    for (int cc = 1; cc < C; ++cc)
      if (c == cc) row = scale[cc];
    cp_async4(sbuf + i, row + b, b < kb);
  }
}

// Shared memory of one warp's buffer, in 16-byte chunks: the weight chunks, then the scales.
template <class F, int C, int CH>
__host__ __device__ constexpr int warp_dots_chunks() {
  return C * CH * 32 + (F::kScaled ? C * CH : 0);  // C · CH · 4 floats
}

// dot[r][c] += this lane's share of x[r] · w[c] over k elements (k % F::kPerChunk == 0, 16-byte
// aligned rows). The first pass issues the weight copies, then waits for the previous kernel
// (pdl_wait: the weights and scales are constant, the activation rows are not) and copies the R
// rows x[r] into xs [R][k / 8] with the whole block; its end is a block barrier, so every thread of
// the block must call this with the same k, and warps with active == false (warp-uniform) only take
// part in it. wbuf: this warp's warp_dots_chunks<F, C, CH>() chunks. Every w[c] and x[r] must be
// readable: callers with fewer columns or rows repeat the last one and ignore the extra sums.
// warp_dots_staged: the same with the rows staged by stage(xs) in place of the copies: called by
// every thread of the block after pdl_wait, it writes xs in the copies' layout (kX = 1 for BF16
// weights: row r's chunk c at xs[r * k / 8 + c]) with plain stores or cp.async (committed after it);
// the block barrier after it makes them visible.
template <class F, int R, int C, int CH, class Stage>
__device__ __forceinline__ void warp_dots_staged(const WeightRows<C>& w, Stage stage, uint4* xs, int k, int lane,
                                                 uint4* wbuf, bool active, float (&dot)[R][C]) {
  constexpr int kX = F::kPerChunk / 8;  // x chunks per weight chunk
  const int kc = k / F::kPerChunk, xc = k / 8;
  float* const sbuf = reinterpret_cast<float*>(wbuf + C * CH * 32);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int k0 = 0; k0 < kc; k0 += CH * 32) {
    if (active) {
      if constexpr (F::kScaled) {
        if (k0 > 0) __syncwarp();  // every lane has read the previous pass's scales
        copy_pass_scales<C, CH>(w.scale, sbuf, k0 / 8, (kc + 7) / 8, lane);
      }
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int ch = k0 + j * 32 + lane;
#pragma unroll
        for (int c = 0; c < C; ++c)
          cp_async16(wbuf + (c * CH + j) * 32 + lane, static_cast<const uint4*>(w.w[c]) + ch, ch < kc);
      }
    }
    if (k0 == 0) {
      pdl_wait();
      pdl_trigger();
      stage(xs);
    }
    cp_async_commit();
    cp_async_wait<0>();
    if (k0 == 0)
      __syncthreads();
    else if (F::kScaled && active)
      __syncwarp();  // the scales the other lanes copied
    if (!active) continue;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const int ch = k0 + j * 32 + lane;
      float s[C];
#pragma unroll
      for (int c = 0; c < C; ++c) s[c] = F::kScaled ? sbuf[(c * CH + j) * 4 + (lane >> 3)] : 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        uint4 xr[kX];  // past k: zeros (the weights there are zero-filled too)
#pragma unroll
        for (int i = 0; i < kX; ++i) xr[i] = ch < kc ? xs[r * xc + i * kc + min(ch, kc - 1)] : zero;
#pragma unroll
        for (int c = 0; c < C; ++c) dot[r][c] = F::dot(wbuf[(c * CH + j) * 32 + lane], xr, s[c], dot[r][c]);
      }
    }
  }
}

template <class F, int R, int C, int CH>
__device__ __forceinline__ void warp_dots(const WeightRows<C>& w, const __nv_bfloat16* const (&x)[R], uint4* xs, int k,
                                          int lane, uint4* wbuf, bool active, float (&dot)[R][C]) {
  constexpr int kX = F::kPerChunk / 8;
  warp_dots_staged<F, R, C, CH>(
      w, [&](uint4* dst) { copy_rows_async<R, kX>(dst, x, k); }, xs, k, lane, wbuf, active, dot);
}

}  // namespace cpinfer::cuda
