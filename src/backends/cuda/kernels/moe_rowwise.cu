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
