// FP8 weights times quantized activations on the tensor cores (mma.sync m16n8k32 e4m3, compute
// capability >= 8.9) for decode-sized products: what moe_rowwise.cu's expert kernel and
// skinny_gemm.cu's dense kernel share. The widening kernels of gemv.cuh issue ~3.5 instructions per
// code (each code e4m3 -> half -> fp32, each activation unpacked, an FMA) and are bound by
// instruction issue at batch 1 (docs/fp8.md); here a warp's 16 weight rows are an mma's rows and up
// to 8 activation rows its columns, so a code costs a fraction of an instruction.
// - The activations are quantized as prefill quantizes them (per row and 128 columns, amax / 448,
//   kernels/fp8.cu), by the whole block into shared memory: xq [kCols][k + kXPad] codes, xs
//   [kCols][k / 128] scales; columns past the rows get zero codes and a zero scale (they add nothing).
// - The codes go into each warp's own buffer with cp.async, each lane copying exactly the bytes it
//   reads back, so its own wait suffices. Lane (g, t) copies bytes [16t, 16t + 16) and [64 + 16t,
//   64 + 16t + 16) of each 128-code block of its two rows (mma rows g and g + 8): each copy
//   instruction reads 64 contiguous bytes of 8 rows, each shared-memory read is 16 consecutive
//   bytes per lane. Step s of a block uses words 2 (s % 2) and 2 (s % 2) + 1 of chunk s / 2 as the
//   mma's k = 4t.. and 16 + 4t..; the activation rows are read in the same order (the sums do not
//   depend on the order of k).
// - Per block the 4 mma accumulate into a temporary that is added times the weight block's and the
//   activation block's scales (prefill's promotion).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/mma.cuh"

namespace cpinfer::cuda::fp8mma {

constexpr int kWarps = 4;        // warps per block
constexpr int kCols = 8;         // activation rows per group: the mma's n
constexpr int kPassBlocks = 16;  // 128-code blocks per weight pass (2 KB per block and warp)
constexpr int kXPad = 64;        // bytes after each quantized row: rows g, g + 1 on other banks

inline size_t smem_bytes(int64_t k) {
  const int64_t kb = k / kFp8Blk, pass = kb < kPassBlocks ? kb : kPassBlocks;
  return static_cast<size_t>(kCols * (k + kXPad) + kCols * kb * 4 + kWarps * pass * 2048);
}
inline bool supported(int64_t k) {
  return k > 0 && k % kFp8Blk == 0 && k <= (int64_t{1} << 20) && smem_bytes(k) <= 227 * 1024;
}

// A lane's two mma rows (g and g + 8 of its warp's 16) and their block-scale rows.
struct Rows {
  const uint8_t* a;
  const uint8_t* b;
  const float* sa;
  const float* sb;
};

// The block's shared memory (smem_bytes(k)) as this warp sees it.
struct Tile {
  uint8_t* xq;
  float* xs;
  uint4* wbuf;
  int xstride, kb, pass;
  __device__ Tile(uint4* smem, int k, int warp)
      : xq(reinterpret_cast<uint8_t*>(smem)), xstride(k + kXPad), kb(k / kFp8Blk), pass(min(k / kFp8Blk, kPassBlocks)) {
    xs = reinterpret_cast<float*>(xq + kCols * xstride);
    wbuf = reinterpret_cast<uint4*>(xs + kCols * kb) + warp * pass * 128;
  }
};

// Blocks b0 .. b0 + pass - 1 of the lane's rows into the warp's buffer (zeros past kb): block b,
// slot q (row a chunk t, row a chunk 4 + t, row b chunk t, row b chunk 4 + t) at wbuf[b · 128 + q ·
// 32 + lane]. Not committed.
__device__ __forceinline__ void copy_pass(const Tile& s, const Rows& r, int b0, int lane) {
  const int t = lane & 3;
  for (int b = 0; b < s.pass; ++b) {
    const bool ok = b0 + b < s.kb;
    const int64_t off = static_cast<int64_t>(min(b0 + b, s.kb - 1)) * kFp8Blk + 16 * t;
    uint4* const d = s.wbuf + b * 128 + lane;
    cp_async16(d, r.a + off, ok);
    cp_async16(d + 32, r.a + off + 64, ok);
    cp_async16(d + 64, r.b + off, ok);
    cp_async16(d + 96, r.b + off + 64, ok);
  }
}

// Columns 0 .. n_rows - 1 from the BF16 rows row(c) (k values, 8-byte aligned), the others zero; a
// warp takes a (column, block) pair at a time, a lane 4 of its 128 values. Every warp of the block
// calls it; a barrier must follow before the columns are read.
template <class RowPtr>
__device__ __forceinline__ void quantize(const Tile& s, int n_rows, RowPtr row, int warp, int lane) {
  for (int i = warp; i < kCols * s.kb; i += kWarps) {
    const int c = i / s.kb, b = i - c * s.kb;
    uint32_t codes = 0;
    float scale = 0.0f;
    if (c < n_rows) {  // warp-uniform
      const uint2 raw = *reinterpret_cast<const uint2*>(row(c) + b * kFp8Blk + 4 * lane);
      const float v[4] = {bf16_lo(raw.x), bf16_hi(raw.x), bf16_lo(raw.y), bf16_hi(raw.y)};
      scale = fp8_block_scale(warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])))));
#pragma unroll
      for (int j = 0; j < 4; ++j) codes |= static_cast<uint32_t>(f32_to_e4m3(v[j] / scale)) << (8 * j);
    }
    *reinterpret_cast<uint32_t*>(s.xq + c * s.xstride + b * kFp8Blk + 4 * lane) = codes;
    if (lane == 0) s.xs[c * s.kb + b] = scale;
  }
}

// The blocks of the pass at b0 into acc: c0, c1 row a at columns 2t, 2t + 1; c2, c3 row b.
__device__ __forceinline__ void multiply(const Tile& s, const Rows& r, int b0, int lane, float (&acc)[4]) {
  const int g = lane >> 2, t = lane & 3;
  const int n_b = min(s.pass, s.kb - b0);
  for (int b = 0; b < n_b; ++b) {
    const int kbi = b0 + b;
    const uint4* const w = s.wbuf + b * 128 + lane;
    const uint4 a_lo = w[0], a_hi = w[32], b_lo = w[64], b_hi = w[96];
    const uint8_t* const xr = s.xq + g * s.xstride + kbi * kFp8Blk + 16 * t;
    const uint4 x_lo = *reinterpret_cast<const uint4*>(xr), x_hi = *reinterpret_cast<const uint4*>(xr + 64);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_e4m3(d, a_lo.x, b_lo.x, a_lo.y, b_lo.y, x_lo.x, x_lo.y);
    mma_e4m3(d, a_lo.z, b_lo.z, a_lo.w, b_lo.w, x_lo.z, x_lo.w);
    mma_e4m3(d, a_hi.x, b_hi.x, a_hi.y, b_hi.y, x_hi.x, x_hi.y);
    mma_e4m3(d, a_hi.z, b_hi.z, a_hi.w, b_hi.w, x_hi.z, x_hi.w);
    const float wsa = __ldg(r.sa + kbi), wsb = __ldg(r.sb + kbi);
    const float x0 = s.xs[(2 * t) * s.kb + kbi], x1 = s.xs[(2 * t + 1) * s.kb + kbi];
    acc[0] = fmaf(d[0], wsa * x0, acc[0]);
    acc[1] = fmaf(d[1], wsa * x1, acc[1]);
    acc[2] = fmaf(d[2], wsb * x0, acc[2]);
    acc[3] = fmaf(d[3], wsb * x1, acc[3]);
  }
}

// One group of n_rows <= kCols activation rows: quantize them, then the whole K into acc. The
// first pass of the codes was issued by the caller (copy_pass(s, r, 0, lane), before its pdl_wait);
// later passes, and every pass of a later group when the row does not fit one pass, are issued
// here. first: the kernel's first group (else a barrier first: every warp is done with the previous
// columns). on: this warp has rows (else it only quantizes and joins the barriers). Every warp of
// the block calls it.
template <class RowPtr>
__device__ __forceinline__ void group_product(const Tile& s, const Rows& r, bool on, bool first, int n_rows, RowPtr row,
                                              int warp, int lane, float (&acc)[4]) {
  if (!first) __syncthreads();
  quantize(s, n_rows, row, warp, lane);
  __syncthreads();
  const bool resident = s.kb <= kPassBlocks;  // one pass holds the whole row: copied once
  for (int b0 = 0; b0 < s.kb; b0 += s.pass) {
    if (on && !resident && (!first || b0 > 0)) copy_pass(s, r, b0, lane);  // a lane overwrites what it read
    cp_async_commit();
    cp_async_wait<0>();
    if (on) multiply(s, r, b0, lane, acc);
  }
}

}  // namespace cpinfer::cuda::fp8mma
