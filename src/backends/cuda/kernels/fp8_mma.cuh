// FP8 weights times quantized activations on the tensor cores (mma.sync m16n8k32 e4m3, compute
// capability >= 8.9) for decode-sized products: skinny_gemm.cu's FP8 projections of up to 16 rows
// on Hopper. The widening kernels of gemv.cuh issue ~3.5 instructions per code (each code e4m3 ->
// half -> fp32, each activation unpacked, an FMA) and take 2 rows at most; here 16 weight rows are
// an mma's rows and up to 8 activation rows its columns, a group; two groups (9 to 16 rows) share
// each weight fragment a warp loads. (The experts keep the widening kernels: an expert kernel built
// on this was slower, since every tile quantizes the activations again and most experts see one row
// at decode: docs/fp8.md.)
// - A block computes one tile of 16 weight rows over the whole K; its warps split K: warp w takes
//   the passes of kChunk 128-code blocks w, w + W, ... (W = warps<G>(k) <= kMaxWarps / G), and the
//   warps' sums meet in shared memory at the end. Many small blocks keep every SM busy at decode
//   sizes (a tile per warp over the whole K leaves most SMs idle: o_proj has 128 tiles).
// - A pass's codes are loaded straight into registers (ld.global.nc, not cached in L1), all
//   4 · kChunk loads of a lane issued before the first is used: 2 KB per block and warp, 4 KB in
//   flight per warp. Lane (g, t) holds bytes [16t, 16t + 16) and [64 + 16t, 64 + 16t + 16) of each
//   128-code block of its rows g and g + 8: each load instruction reads 64 contiguous bytes of 8
//   rows. Word j of such a chunk is the mma's k = 4t.. (j even) or 16 + 4t.. (j odd) of the mma
//   that takes words j - j % 2, j - j % 2 + 1; the activations are taken in the same order (the
//   sums do not depend on the order of k).
// - Each warp quantizes the activations of its own blocks as prefill does (per row and 128 columns:
//   scale = amax / 448, codes e4m3 nearest-even, saturating) in registers: lane (g, t) loads the 32
//   BF16 values of activation row g that meet its codes, the 4 lanes of a row together hold the
//   block's 128 and find its amax with two shuffles. Rows past n_rows are zero codes (they add
//   nothing). The quotients are prefill's, correctly rounded (a reciprocal and one correction).
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

constexpr int kCols = 8;       // activation rows per group: the mma's n
constexpr int kMaxGroups = 2;  // groups per block: up to 16 activation rows
constexpr int kChunk = 2;      // 128-code blocks per warp and pass
constexpr int kMaxWarps = 16;  // warps per block of one group (K = 4096: 16 passes of 2 blocks, one per warp)

// Warps per block of G groups: the registers of G groups' activations (about 190 a thread at G = 2)
// allow kMaxWarps / G.
template <int G>
__host__ __device__ constexpr int max_warps() {
  return kMaxWarps / G;
}
template <int G>
__host__ __device__ constexpr int warps(int k) {
  const int passes = (k / kFp8Blk + kChunk - 1) / kChunk;
  return passes < max_warps<G>() ? passes : max_warps<G>();
}
inline bool supported(int64_t k) { return k > 0 && k % kFp8Blk == 0 && k <= (int64_t{1} << 20); }

// A lane's two mma rows (g and g + 8 of the tile) and their block-scale rows.
struct Rows {
  const uint8_t* a;
  const uint8_t* b;
  const float* sa;
  const float* sb;
};

// One pass of a warp: blocks b0 .. b0 + kChunk - 1; v[j] = row a chunk t, row a chunk 4 + t, row b
// chunk t, row b chunk 4 + t of block b0 + j (zeros past kb).
struct Pass {
  uint4 v[kChunk][4];
};

__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void load_pass(Pass& p, const Rows& r, int b0, int kb, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (b0 + j < kb) {  // warp-uniform
      const int64_t off = static_cast<int64_t>(b0 + j) * kFp8Blk + 16 * t;
      p.v[j][0] = ld_stream(r.a + off);
      p.v[j][1] = ld_stream(r.a + off + 64);
      p.v[j][2] = ld_stream(r.b + off);
      p.v[j][3] = ld_stream(r.b + off + 64);
    }
  }
}

__device__ __forceinline__ uint4 ld_act(const __nv_bfloat16* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// The 32 BF16 values of activation row x (nullptr: a row past n_rows, zeros) that meet this lane's
// codes in each block of the pass at b0: columns 16t .. 16t + 15 and 64 + 16t .. 64 + 16t + 15.
// Issued together with the pass's weights, before anything waits for them.
__device__ __forceinline__ void load_act(uint4 (&raw)[kChunk][4], const __nv_bfloat16* x, int b0, int kb, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    raw[j][0] = raw[j][1] = raw[j][2] = raw[j][3] = make_uint4(0, 0, 0, 0);
    if (x && b0 + j < kb) {
      const __nv_bfloat16* const p = x + (b0 + j) * kFp8Blk + 16 * t;
      raw[j][0] = ld_act(p);
      raw[j][1] = ld_act(p + 8);
      raw[j][2] = ld_act(p + 64);
      raw[j][3] = ld_act(p + 72);
    }
  }
}

// The e4m3 codes of one block's raw values (load_act) in the order of the lane's weight words (q[0..3]:
// columns 16t .. 16t + 15, q[4..7]: 64 + 16t ..) and the block's scale (0 for a row past n_rows,
// whose codes are 0). Every lane of the warp calls it (the shuffles).
__device__ __forceinline__ float quantize_block(const uint4 (&raw)[4], bool row, uint32_t (&q)[8]) {
  float v[32];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[8 * i + 2 * j] = bf16_lo(w[j]);
      v[8 * i + 2 * j + 1] = bf16_hi(w[j]);
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float scale = fp8_block_scale(amax), inv = 1.0f / scale;
  const auto quot = [&](float x) { return fp8_quotient(x, scale, inv); };  // v / scale, as prefill's
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t lo =
        __nv_cvt_float2_to_fp8x2(make_float2(quot(v[4 * i]), quot(v[4 * i + 1])), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi =
        __nv_cvt_float2_to_fp8x2(make_float2(quot(v[4 * i + 2]), quot(v[4 * i + 3])), __NV_SATFINITE, __NV_E4M3);
    q[i] = lo | (hi << 16);
  }
  return row ? scale : 0.0f;
}

// acc[i] += this warp's share of the tile's 16 rows times group i's activation rows: x[i] is this
// lane's row g of group i (nullptr past n_rows). The weight fragments of a block serve every group.
// The warp's first pass is already in p (load_pass(p, r, warp · kChunk, kb, lane) by the caller,
// before its pdl_wait).
template <int G>
__device__ __forceinline__ void warp_product(const Rows& r, int kb, const __nv_bfloat16* const (&x)[G], int warp,
                                             int n_warps, int lane, Pass& p, float (&acc)[G][4]) {
  const int t = lane & 3;
  for (int b0 = warp * kChunk; b0 < kb; b0 += n_warps * kChunk) {
    if (b0 != warp * kChunk) load_pass(p, r, b0, kb, lane);
    uint4 raw[G][kChunk][4];
#pragma unroll
    for (int i = 0; i < G; ++i) load_act(raw[i], x[i], b0, kb, lane);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int b = b0 + j;
      if (b >= kb) break;  // warp-uniform
      const uint4 a_lo = p.v[j][0], a_hi = p.v[j][1], b_lo = p.v[j][2], b_hi = p.v[j][3];
      const float wsa = __ldg(r.sa + b), wsb = __ldg(r.sb + b);
#pragma unroll
      for (int i = 0; i < G; ++i) {
        uint32_t q[8];
        const float xs = quantize_block(raw[i][j], x[i] != nullptr, q);
        const float x0 = __shfl_sync(0xffffffffu, xs, 8 * t), x1 = __shfl_sync(0xffffffffu, xs, 8 * t + 4);
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_e4m3(d, a_lo.x, b_lo.x, a_lo.y, b_lo.y, q[0], q[1]);
        mma_e4m3(d, a_lo.z, b_lo.z, a_lo.w, b_lo.w, q[2], q[3]);
        mma_e4m3(d, a_hi.x, b_hi.x, a_hi.y, b_hi.y, q[4], q[5]);
        mma_e4m3(d, a_hi.z, b_hi.z, a_hi.w, b_hi.w, q[6], q[7]);
        acc[i][0] = fmaf(d[0], wsa * x0, acc[i][0]);
        acc[i][1] = fmaf(d[1], wsa * x1, acc[i][1]);
        acc[i][2] = fmaf(d[2], wsb * x0, acc[i][2]);
        acc[i][3] = fmaf(d[3], wsb * x1, acc[i][3]);
      }
    }
  }
}

// The block's warps' acc summed into warp 0's (true there). Every warp of the block calls it, once.
struct Reduce {
  float v[kMaxWarps - 1][4][32];
};
template <int G>
__device__ __forceinline__ bool block_sum(Reduce& red, int warp, int n_warps, int lane, float (&acc)[G][4]) {
  static_assert(G * (max_warps<G>() - 1) <= kMaxWarps - 1, "the warps' sums must fit Reduce");
  if (n_warps == 1) return true;
  if (warp > 0)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) red.v[(warp - 1) * G + g][i][lane] = acc[g][i];
  __syncthreads();
  if (warp == 0)
    for (int w = 1; w < n_warps; ++w)
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[g][i] += red.v[(w - 1) * G + g][i][lane];
  return warp == 0;
}

}  // namespace cpinfer::cuda::fp8mma
