// The row-wise expert GEMMs: small batches (decode) and shapes the grouped tensor-core GEMMs do not
// take, for BF16 experts and FP8 ones (ops/backend.h Weight: e4m3 codes + one F32 scale per 128 x
// 128 block, W = code · scale, read as they are: 1 byte per weight; the activations stay BF16, no
// activation quantization). One launch per GEMM covers every local expert, reading the segment
// rows on the device (kernels.h MoeRowSource: the permute's segments, or the router's pairs), so no
// host synchronization.
// kGateUp: act[r, n] = silu(bf16(x[tok(r)] · gate[n])) · bf16(x[tok(r)] · up[n]), rounded to bf16
// like the cuBLAS path (whose GEMMs write bf16). Otherwise: y[r, n] = act[r] · down[n] in F32.
// Products and sums in fp32; an FP8 block scale multiplies the partial sum of its 16 codes (gemv.cuh
// Fp8Weights), or each code on the scalar path (code · scale rounded once, as the CPU reference).
#include <type_traits>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

// One GEMM's device tables of `count` pointers: w1 (gate or down) and w2 (up, gate‖up only), and
// for FP8 their scales s1, s2.
struct ExpertTables {
  const void* const* w1;
  const void* const* w2;
  const void* const* s1;
  const void* const* s2;
};

// Grid row blockIdx.y's expert e and its rows [begin, end) of act and y; false when it has none.
// Read from L2 (__ldcg): the down GEMM reads them before its pdl_wait (see moe_small_gemm_kernel).
__device__ __forceinline__ bool small_gemm_segment(const MoeRowSource& s, int count, int& e, int& begin, int& end) {
  if (s.ids) {  // pairs: row p is pair p
    begin = static_cast<int>(blockIdx.y);
    end = begin + 1;
    e = __ldcg(s.ids + begin) - s.first;
    return e >= 0 && e < count;
  }
  if (s.active && static_cast<int>(blockIdx.y) >= __ldcg(s.active)) return false;
  e = s.active ? __ldcg(s.active + 1 + blockIdx.y) : static_cast<int>(blockIdx.y);
  begin = __ldcg(s.offsets + e);
  end = __ldcg(s.offsets + e + 1);
  return begin < end;
}
// The x row of act row `row` (gate‖up).
__device__ __forceinline__ int64_t small_gemm_token(const MoeRowSource& s, int row) {
  return s.ids ? row / s.top_k : s.src_token[row];
}

__device__ __forceinline__ float silu_mul_bf16(float g, float u) {
  g = to_f32(from_f32<__nv_bfloat16>(g));
  u = to_f32(from_f32<__nv_bfloat16>(u));
  return g / (1.0f + __expf(-g)) * u;
}

// Weight row n of expert e's matrix in table w (scales in s) into slot i of `rows`.
template <class F, int C>
__device__ __forceinline__ void expert_row(WeightRows<C>& rows, int i, const void* const* w, const void* const* s,
                                           int e, int64_t n, int k_dim) {
  rows.template set<F>(i, w[e], F::kScaled ? static_cast<const float*>(s[e]) : nullptr, n, k_dim);
}

// 16-byte path (k_dim % F::kPerChunk == 0, aligned rows): each warp streams the weight rows of kCols
// output columns (gate and up rows for gate‖up) through warp_dots (gemv.cuh: a whole pass of copies
// in flight before the first multiply), for kRows segment rows at a time; a segment of more rows
// re-reads them (from L2) per group. An FP8 chunk holds twice the weights: twice the columns per
// warp at half the chunks per pass, the same bytes.
constexpr int kSmallWarps = 4;
constexpr int kSmallRows = 2;
template <class F, bool kGateUp>
__host__ __device__ constexpr int small_cols() {
  return (kGateUp ? 1 : 4) * (F::kPerChunk / 8);
}
template <class F, bool kGateUp>
__host__ __device__ constexpr int small_weight_rows() {
  return kGateUp ? 2 * small_cols<F, kGateUp>() : small_cols<F, kGateUp>();  // gate rows, then up rows
}
template <class F, bool kGateUp, int kCh>
size_t small_smem_bytes(int k_dim) {
  return (static_cast<size_t>(kSmallRows) * (k_dim / 8) +
          static_cast<size_t>(kSmallWarps) * warp_dots_chunks<F, small_weight_rows<F, kGateUp>(), kCh>()) *
         16;
}

template <class F, bool kGateUp, int kCh>
__global__ void __launch_bounds__(kSmallWarps * 32)
    moe_small_gemm_kernel(const __nv_bfloat16* __restrict__ in, const MoeRowSource rs, int count, const ExpertTables t,
                          int n_out, int k_dim, void* __restrict__ out) {
  constexpr int kCols = small_cols<F, kGateUp>();
  constexpr int kW = small_weight_rows<F, kGateUp>();
  extern __shared__ uint4 smem[];
  // The segments (or pairs) come from the kernel before gate‖up (the permute or the router): gate‖up
  // waits for it. The down GEMM runs after gate‖up, whose every block waited before it let this
  // kernel launch, so the segments are complete already: it reads them and issues its expert's
  // weight copies under gate‖up's tail, and waits (in warp_dots) only before it reads act.
  if constexpr (kGateUp) {
    pdl_wait();
    pdl_trigger();
  }
  int e, begin, end;
  if (!small_gemm_segment(rs, count, e, begin, end)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * (kSmallWarps * kCols) + warp * kCols;
  const bool on = n0 < n_out;  // warps past n_out only join the barriers
  const int n_cols = on ? min(kCols, n_out - n0) : 1;
  WeightRows<kW> rows;  // rows past n_out repeat the last valid one (read, never written)
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t n = min(n0 + min(c, n_cols - 1), n_out - 1);
    expert_row<F>(rows, c, t.w1, t.s1, e, n, k_dim);
    if constexpr (kGateUp) expert_row<F>(rows, kCols + c, t.w2, t.s2, e, n, k_dim);
  }
  uint4* const xs = smem;
  uint4* const wbuf = smem + kSmallRows * (k_dim / 8) + warp * warp_dots_chunks<F, kW, kCh>();
  // kR segment rows at a time: a group of one row (every segment at batch 1, most at small batches)
  // runs the one-row code, not two copies of the row.
  auto rows_pass = [&](auto rows_const, int r0, int n_rows) {
    constexpr int kR = decltype(rows_const)::value;
    const __nv_bfloat16* x[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int row = r0 + min(r, n_rows - 1);
      x[r] = in + (kGateUp ? small_gemm_token(rs, row) : row) * k_dim;
    }
    if (r0 > begin) __syncthreads();  // every warp is done with the previous rows in xs
    float dot[kR][kW];
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int c = 0; c < kW; ++c) dot[r][c] = 0.0f;
    warp_dots<F, kR, kW, kCh>(rows, x, xs, k_dim, lane, wbuf, on, dot);
    if (!on) return;
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int c = 0; c < kW; ++c) dot[r][c] = warp_sum(dot[r][c]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (r >= n_rows) break;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          if (c >= n_cols) break;
          const int64_t o = static_cast<int64_t>(r0 + r) * n_out + n0 + c;
          if constexpr (kGateUp)
            static_cast<__nv_bfloat16*>(out)[o] = from_f32<__nv_bfloat16>(silu_mul_bf16(dot[r][c], dot[r][kCols + c]));
          else
            static_cast<float*>(out)[o] = dot[r][c];
        }
      }
    }
  };
  for (int r0 = begin; r0 < end; r0 += kSmallRows) {
    const int n_rows = min(kSmallRows, end - r0);
    if (n_rows == 1)
      rows_pass(std::integral_constant<int, 1>{}, r0, n_rows);
    else
      rows_pass(std::integral_constant<int, kSmallRows>{}, r0, n_rows);
  }
}

// Any k_dim and alignment: one element per lane and step, a warp per output column.
constexpr int kScalarWarps = 8;
template <class F, bool kGateUp>
__global__ void __launch_bounds__(kScalarWarps * 32)
    moe_small_gemm_scalar_kernel(const __nv_bfloat16* __restrict__ in, const MoeRowSource rs, int count,
                                 const ExpertTables t, int n_out, int k_dim, void* __restrict__ out) {
  pdl_wait();
  pdl_trigger();
  int e, begin, end;
  if (!small_gemm_segment(rs, count, e, begin, end)) return;
  const int lane = threadIdx.x & 31, n = blockIdx.x * kScalarWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;
  WeightRows<2> rows;  // gate (or down) and up
  expert_row<F>(rows, 0, t.w1, t.s1, e, n, k_dim);
  if constexpr (kGateUp) expert_row<F>(rows, 1, t.w2, t.s2, e, n, k_dim);
  for (int r = begin; r < end; ++r) {
    const __nv_bfloat16* xr = in + (kGateUp ? small_gemm_token(rs, r) : r) * k_dim;
    float dg = 0.0f, du = 0.0f;
    for (int k = lane; k < k_dim; k += 32) {
      const float xv = to_f32(xr[k]);
      dg += xv * F::weight(rows.w[0], rows.scale[0], k);
      if constexpr (kGateUp) du += xv * F::weight(rows.w[1], rows.scale[1], k);
    }
    dg = warp_sum(dg);
    if constexpr (kGateUp) du = warp_sum(du);
    if (lane != 0) continue;
    const int64_t o = static_cast<int64_t>(r) * n_out + n;
    if constexpr (kGateUp)
      static_cast<__nv_bfloat16*>(out)[o] = from_f32<__nv_bfloat16>(silu_mul_bf16(dg, du));
    else
      static_cast<float*>(out)[o] = dg;
  }
}

// FP8 experts on the tensor cores (mma.m16n8k16, fp32 accumulators; H and I multiples of 128). The
// kernel above issues ~3.5 instructions per code (each widened to fp32, the activation unpacked, an
// FMA), which bounds it once the codes have arrived; here the codes widen to FP16 (exact, one cvt
// per two codes) and go to the mma: about a quarter of the instructions. The activations go to FP16
// per 128-column block times a power of two (the block's amax lands in [2^14, 2^15)): exact for
// every BF16 value above amax · 2^-28 (FP16 holds BF16's 8 bits), so the products are exact and
// nothing is quantized. (BF16 experts on the same kernel, their fragments as they are, were slower
// than the kernel above: docs/benchmarks.md.)
// - A CTA takes a tile of 16 weight rows, the mma's m (gate‖up: the gate and the up rows of 8
//   output columns, so that one lane holds both halves of its silu · mul; down: 16 rows), and a
//   segment's activation rows a few at a time (at most 8, the mma's n); its warps split K by
//   128-code blocks (warp w: blocks w, w + W, ...) and their sums meet in shared memory.
// - Lane (g, t) copies bytes [16t, 16t + 16) of both 64-code halves of each of its blocks of rows g
//   and g + 8 (cp.async; before the pdl wait where the expert is known, as the kernel above) and
//   reads back only those: they are its k-slots of the four mma over the half (the order of k in a
//   sum does not matter); the activations are taken in the same order.
// - The block scales of weight and activation multiply each block's partial sum once.
namespace rowmma {
constexpr int kN = 8;       // activation rows per pass: the mma's n
constexpr int kTileM = 16;  // weight rows per CTA: the mma's m
constexpr int kMaxWarps = 4;
// Warps for kb blocks: the largest divisor of kb up to kMaxWarps (every warp the same blocks), or
// kMaxWarps when only 1 divides.
inline int warps(int kb) {
  for (int w = kMaxWarps; w > 1; --w)
    if (kb % w == 0) return w;
  return kb < kMaxWarps ? kb : kMaxWarps;
}
// The staged activation rows' stride in elements: with several rows, a row and the next start 16
// bytes apart in the banks, so the rows of an mma's n read conflict-free.
__host__ __device__ inline int x_stride(int k, int rows) { return rows > 1 ? k + 8 : k; }
// Shared memory in 16-byte units: weights [W][nbw][4][32], weight scales [W][2][nbw] floats,
// activations [rows][x_stride] FP16, their scales [rows][kb] floats, and with several rows the
// warps' sums [W - 1][4][32] (a segment's last rows, and so every pass of one row, leave each warp's
// sums in its own weight buffer instead: at batch 1 that keeps six gate‖up CTAs of 4 warps on an SM,
// the whole GEMM in one wave). One row only where a segment has one (pairs).
struct Layout {
  int w, sc, x, xs, red, total;
  __host__ __device__ Layout(int n_warps, int kb, int k, int rows) {
    const int nbw = (kb + n_warps - 1) / n_warps;
    w = 0;
    sc = w + n_warps * nbw * 4 * 32;
    x = sc + (n_warps * 2 * nbw + 3) / 4;
    xs = x + rows * x_stride(k, rows) / 8;
    red = xs + (rows * kb + 3) / 4;
    total = red + (rows > 1 ? (n_warps - 1) * 4 * 32 / 4 : 0);
  }
};

// The activations' block exponent: E for amax in [2^E, 2^(E + 1)), at least -100; 14 for a zero
// or non-finite amax. value · 2^(14 - E) is FP16 with the amax in [2^14, 2^15).
__device__ __forceinline__ int act_exponent(float amax) {
  if (!(amax > 0.0f) || !(amax <= 3.4e38f)) return 14;
  const int e = static_cast<int>((__float_as_uint(amax) >> 23) & 0xffu) - 127;
  return e < -100 ? -100 : e;
}
__device__ __forceinline__ float pow2(int e) { return __uint_as_float(static_cast<uint32_t>(e + 127) << 23); }

// Dynamic shared memory for K = k and `rows` staged rows; supported: H and I multiples of 128 whose
// GEMMs fit an SM's shared memory (227 KB: K up to ~12K).
inline size_t smem_bytes(int64_t k, int rows) {
  const int kb = static_cast<int>(k / kFp8Blk), w = warps(kb);
  return static_cast<size_t>(Layout(w, kb, static_cast<int>(k), rows).total) * 16;
}
constexpr int kMaxRows = 2;  // staged rows per pass (segments; pairs stage one)
inline bool supported(int64_t hidden, int64_t inter) {
  constexpr size_t kMaxSmem = 227 * 1024;
  return hidden % kFp8Blk == 0 && inter % kFp8Blk == 0 && hidden <= (1 << 16) && inter <= (1 << 16) &&
         smem_bytes(hidden, kMaxRows) <= kMaxSmem && smem_bytes(inter, kMaxRows) <= kMaxSmem;
}
}  // namespace rowmma

template <bool kGateUp>
__global__ void __launch_bounds__(rowmma::kMaxWarps * 32)
    moe_fp8_mma_kernel(const __nv_bfloat16* __restrict__ in, const MoeRowSource rs, int count, const ExpertTables t,
                       int n_out, int k_dim, int x_rows, void* __restrict__ out) {
  using namespace rowmma;
  extern __shared__ uint4 smem[];
  if constexpr (kGateUp) {  // as moe_small_gemm_kernel
    pdl_wait();
    pdl_trigger();
  }
  int e, begin, end;
  if (!small_gemm_segment(rs, count, e, begin, end)) return;
  const int n_warps = static_cast<int>(blockDim.x >> 5), warp = static_cast<int>(threadIdx.x >> 5);
  const int lane = static_cast<int>(threadIdx.x & 31), g = lane >> 2, tq = lane & 3;
  const int kb = k_dim / kFp8Blk, nbw = (kb + n_warps - 1) / n_warps;
  const Layout lay(n_warps, kb, k_dim, x_rows);
  constexpr int kCols = kGateUp ? kTileM / 2 : kTileM;  // output columns per CTA
  const int n0 = static_cast<int>(blockIdx.x) * kCols;
  // This lane's A rows g and g + 8, and the tile's scale rows (its 16 rows lie in one 128-row
  // block: n0 is a multiple of kCols).
  const uint8_t *ra, *rb;
  const float *sa, *sb;
  {
    const int64_t brow = static_cast<int64_t>(n0 / kFp8Blk) * kb;
    if constexpr (kGateUp) {
      const int64_t n = min(n0 + g, n_out - 1);
      ra = static_cast<const uint8_t*>(t.w1[e]) + n * k_dim;
      rb = static_cast<const uint8_t*>(t.w2[e]) + n * k_dim;
      sa = static_cast<const float*>(t.s1[e]) + brow;
      sb = static_cast<const float*>(t.s2[e]) + brow;
    } else {
      const int64_t na = min(n0 + g, n_out - 1), nb = min(n0 + 8 + g, n_out - 1);
      ra = static_cast<const uint8_t*>(t.w1[e]) + na * k_dim;
      rb = static_cast<const uint8_t*>(t.w1[e]) + nb * k_dim;
      sa = sb = static_cast<const float*>(t.s1[e]) + brow;
    }
  }
  uint4* const wbuf = smem + lay.w + warp * nbw * 4 * 32;
  float* const wsc = reinterpret_cast<float*>(smem + lay.sc) + warp * 2 * nbw;
  for (int j = 0; j < nbw; ++j) {
    const int b = warp + j * n_warps;
    const bool ok = b < kb;
    const int64_t off = static_cast<int64_t>(ok ? b : 0) * kFp8Blk + 16 * tq;
    cp_async16(wbuf + (j * 4 + 0) * 32 + lane, ra + off, ok);
    cp_async16(wbuf + (j * 4 + 1) * 32 + lane, ra + off + 64, ok);
    cp_async16(wbuf + (j * 4 + 2) * 32 + lane, rb + off, ok);
    cp_async16(wbuf + (j * 4 + 3) * 32 + lane, rb + off + 64, ok);
  }
  for (int i = lane; i < 2 * nbw; i += 32) {
    const int j = i < nbw ? i : i - nbw, b = warp + j * n_warps;
    cp_async4(wsc + i, (i < nbw ? sa : sb) + (b < kb ? b : 0), b < kb);
  }
  cp_async_commit();
  if constexpr (!kGateUp) {
    pdl_wait();
    pdl_trigger();
  }
  uint16_t* const xh = reinterpret_cast<uint16_t*>(smem + lay.x);  // FP16 bits
  float* const xsc = reinterpret_cast<float*>(smem + lay.xs);
  float* const red = reinterpret_cast<float*>(smem + lay.red);
  const int xs_stride = x_stride(k_dim, x_rows), pieces = k_dim / 16;  // 16 values a piece
  for (int r0 = begin; r0 < end; r0 += x_rows) {
    const int n_rows = min(x_rows, end - r0);
    if (r0 > begin) __syncthreads();  // every warp is done with the previous rows and sums
    // Stage the rows in FP16 with their block exponents (a block's 8 pieces: 8 aligned lanes).
    for (int p0 = 0; p0 < n_rows * pieces; p0 += static_cast<int>(blockDim.x)) {
      const int p = p0 + static_cast<int>(threadIdx.x);
      const bool ok = p < n_rows * pieces;
      const int r = ok ? p / pieces : 0, c = ok ? p % pieces : 0;
      uint4 v[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      if (ok) {
        const int row = r0 + r;
        const uint4* src =
            reinterpret_cast<const uint4*>(in + (kGateUp ? small_gemm_token(rs, row) : row) * k_dim + c * 16);
        v[0] = src[0];
        v[1] = src[1];
      }
      const uint32_t w[8] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fmaxf(fabsf(bf16_lo(w[i])), fabsf(bf16_hi(w[i]))));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
      const int ex = act_exponent(amax);
      const float inv = pow2(14 - ex);
      uint32_t h[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const __half2 hv = __floats2half2_rn(bf16_lo(w[i]) * inv, bf16_hi(w[i]) * inv);
        h[i] = *reinterpret_cast<const uint32_t*>(&hv);
      }
      v[0] = make_uint4(h[0], h[1], h[2], h[3]);
      v[1] = make_uint4(h[4], h[5], h[6], h[7]);
      if (ok && (c & 7) == 0) xsc[r * kb + c / 8] = pow2(ex - 14);
      if (ok) {
        uint4* dst = reinterpret_cast<uint4*>(xh + r * xs_stride + c * 16);
        dst[0] = v[0];
        dst[1] = v[1];
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the rows, and each warp's weights and scales (copied by its lanes)
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Lane t's 16 codes of each 64-code half.
    const uint16_t* const xrow = xh + min(g, n_rows - 1) * xs_stride + tq * 16;
    for (int j = 0; j < nbw; ++j) {
      const int b = warp + j * n_warps;
      if (b >= kb) break;
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const uint4 wa = wbuf[(j * 4 + hf) * 32 + lane], wb = wbuf[(j * 4 + 2 + hf) * 32 + lane];
        const uint4* xp = reinterpret_cast<const uint4*>(xrow + b * kFp8Blk + hf * (kFp8Blk / 2));
        const uint4 x0 = xp[0], x1 = xp[1];
        const uint32_t av[4] = {wa.x, wa.y, wa.z, wa.w}, bv[4] = {wb.x, wb.y, wb.z, wb.w};
        const uint32_t xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
          mma_f16(d, fp8x2_to_f16x2(av[i]), fp8x2_to_f16x2(bv[i]), fp8x2_to_f16x2(av[i] >> 16),
                  fp8x2_to_f16x2(bv[i] >> 16), xv[2 * i], xv[2 * i + 1]);
      }
      const float* const xs0 = xsc + min(2 * tq, n_rows - 1) * kb;
      const float* const xs1 = xsc + min(2 * tq + 1, n_rows - 1) * kb;
      const float wa_s = wsc[j], wb_s = wsc[nbw + j], x0_s = xs0[b], x1_s = xs1[b];
      acc[0] = fmaf(d[0], wa_s * x0_s, acc[0]);
      acc[1] = fmaf(d[1], wa_s * x1_s, acc[1]);
      acc[2] = fmaf(d[2], wb_s * x0_s, acc[2]);
      acc[3] = fmaf(d[3], wb_s * x1_s, acc[3]);
    }
    if (n_warps > 1) {
      // Warp w's sums: in its own weight buffer after the segment's last rows, else in red.
      const bool last = r0 + x_rows >= end;
      auto sums = [&](int w) {
        return last ? reinterpret_cast<float*>(smem + lay.w + w * nbw * 4 * 32) : red + (w - 1) * 4 * 32;
      };
      if (warp > 0) {
        __syncwarp();  // every lane is done with the warp's weights
        float* const s = sums(warp);
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i * 32 + lane] = acc[i];
      }
      __syncthreads();
      if (warp != 0) continue;
      for (int w = 1; w < n_warps; ++w) {
        const float* const s = sums(w);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += s[i * 32 + lane];
      }
    }
    // Lane (g, t) holds rows g (acc 0, 1) and g + 8 (acc 2, 3) at activation rows 2t, 2t + 1.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 2 * tq + h;
      if (r >= n_rows) break;
      const int64_t o = static_cast<int64_t>(r0 + r) * n_out;
      if constexpr (kGateUp) {
        if (n0 + g < n_out)
          static_cast<__nv_bfloat16*>(out)[o + n0 + g] = from_f32<__nv_bfloat16>(silu_mul_bf16(acc[h], acc[2 + h]));
      } else {
        if (n0 + g < n_out) static_cast<float*>(out)[o + n0 + g] = acc[h];
        if (n0 + 8 + g < n_out) static_cast<float*>(out)[o + n0 + 8 + g] = acc[2 + h];
      }
    }
  }
}

// Both GEMMs of one call: gate‖up (t1) into act, then down (t2) into y.
template <class F>
cudaError_t launch_rowwise(const DevTensor& x, const MoeRowSource& rs, int count, const ExpertTables& t1,
                           const ExpertTables& t2, int64_t inter, bool vectorized, void* act, float* y,
                           cudaStream_t stream) {
  const int64_t hidden = x.cols();
  if (count == 0) return cudaSuccess;
  if (count > 65535 || x.dtype != DType::BF16 ||
      (vectorized && (hidden % F::kPerChunk != 0 || inter % F::kPerChunk != 0)))
    return cudaErrorInvalidValue;
  if (rs.ids ? (rs.top_k < 1 || rs.n_pairs < 1 || rs.n_pairs > 65535)
             : (rs.offsets == nullptr || rs.src_token == nullptr ||
                (rs.active && (rs.max_active < 1 || rs.max_active > count))))
    return cudaErrorInvalidValue;
  const unsigned ey = static_cast<unsigned>(rs.ids ? rs.n_pairs : rs.active ? rs.max_active : count);  // grid rows
  const auto* xp = x.ptr<const __nv_bfloat16>();
  const auto* actp = static_cast<const __nv_bfloat16*>(act);
  const int n_i = static_cast<int>(inter), n_h = static_cast<int>(hidden);
  if (!vectorized) {
    const dim3 grid1(static_cast<unsigned>((inter + kScalarWarps - 1) / kScalarWarps), ey);
    const dim3 grid2(static_cast<unsigned>((hidden + kScalarWarps - 1) / kScalarWarps), ey);
    const cudaError_t err = launch_k(moe_small_gemm_scalar_kernel<F, true>, grid1, kScalarWarps * 32, 0, stream, xp, rs,
                                     count, t1, n_i, n_h, act);
    if (err != cudaSuccess) return err;
    return launch_k(moe_small_gemm_scalar_kernel<F, false>, grid2, kScalarWarps * 32, 0, stream, actp, rs, count, t2,
                    n_h, n_i, y);
  }
  if constexpr (std::is_same_v<F, Fp8Weights>) {
    if (rowmma::supported(hidden, inter)) {  // the tensor-core kernel
      // Pairs: one row each. Segments (2 to 8 tokens): most have one or two rows; two staged rows
      // keep five CTAs on an SM, and more rows take more passes over the weights the CTA holds.
      const int x_rows = rs.ids ? 1 : rowmma::kMaxRows;
      static_assert(rowmma::kMaxRows <= rowmma::kN, "an mma's n holds the rows of a pass");
      auto go = [&](auto kernel, int cols, const __nv_bfloat16* src, const ExpertTables& t, int n_out, int k_dim,
                    void* o) {
        const int w = rowmma::warps(k_dim / kFp8Blk);
        const size_t smem = rowmma::smem_bytes(k_dim, x_rows);
        const unsigned gx = static_cast<unsigned>((n_out + cols - 1) / cols);
        return launch_k(kernel, dim3(gx, ey), w * 32, smem, stream, src, rs, count, t, n_out, k_dim, x_rows, o);
      };
      const cudaError_t err = go(moe_fp8_mma_kernel<true>, rowmma::kTileM / 2, xp, t1, n_i, n_h, act);
      if (err != cudaSuccess) return err;
      return go(moe_fp8_mma_kernel<false>, rowmma::kTileM, actp, t2, n_h, n_i, y);
    }
  }
  // One pass of 256 · kCh BF16 weights (512 · kCh FP8 codes) per weight row: kCh = 4 / kX for rows up
  // to 1024 weights (down at I = 768), else 8 / kX (a longer row takes several passes).
  constexpr int kX = F::kPerChunk / 8;
  auto go = [&](auto kernel, size_t smem, int cols, const __nv_bfloat16* src, const ExpertTables& t, int n_out,
                int k_dim, void* o) {
    const unsigned gx = static_cast<unsigned>((n_out + kSmallWarps * cols - 1) / (kSmallWarps * cols));
    return launch_k(kernel, dim3(gx, ey), kSmallWarps * 32, smem, stream, src, rs, count, t, n_out, k_dim, o);
  };
  constexpr int c1 = small_cols<F, true>(), c2 = small_cols<F, false>();
  const cudaError_t err = hidden <= 1024 ? go(moe_small_gemm_kernel<F, true, 4 / kX>,
                                              small_smem_bytes<F, true, 4 / kX>(n_h), c1, xp, t1, n_i, n_h, act)
                                         : go(moe_small_gemm_kernel<F, true, 8 / kX>,
                                              small_smem_bytes<F, true, 8 / kX>(n_h), c1, xp, t1, n_i, n_h, act);
  if (err != cudaSuccess) return err;
  return inter <= 1024 ? go(moe_small_gemm_kernel<F, false, 4 / kX>, small_smem_bytes<F, false, 4 / kX>(n_i), c2, actp,
                            t2, n_h, n_i, y)
                       : go(moe_small_gemm_kernel<F, false, 8 / kX>, small_smem_bytes<F, false, 8 / kX>(n_i), c2, actp,
                            t2, n_h, n_i, y);
}

}  // namespace

cudaError_t launch_moe_rowwise_gemms(const DevTensor& x, const MoeRowSource& rows, int count, const void* const* gate,
                                     const void* const* up, const void* const* down, int64_t inter, bool vectorized,
                                     void* act, float* y, cudaStream_t stream) {
  return launch_rowwise<Bf16Weights>(x, rows, count, {gate, up, nullptr, nullptr}, {down, nullptr, nullptr, nullptr},
                                     inter, vectorized, act, y, stream);
}

cudaError_t launch_moe_rowwise_gemms_fp8(const DevTensor& x, const MoeRowSource& rows, int count,
                                         const Fp8ExpertTables& t, int64_t inter, bool vectorized, void* act, float* y,
                                         cudaStream_t stream) {
  return launch_rowwise<Fp8Weights>(x, rows, count, {t.gate, t.up, t.gate_scale, t.up_scale},
                                    {t.down, nullptr, t.down_scale, nullptr}, inter, vectorized, act, y, stream);
}

}  // namespace cpinfer::cuda
