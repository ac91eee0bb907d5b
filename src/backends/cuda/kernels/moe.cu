// MoE kernels: the router (softmax + top-k per token, one warp per token), the counting sort that
// groups (token, k) pairs by local expert (and the per-expert M-tile prefix sum the grouped GEMMs
// of moe_gemm.cu schedule from), the row-wise expert GEMMs of small batches and odd shapes, and
// the weighted un-permute into the output.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

// kPer values per lane: expert e = i * 32 + lane lives in p[i] of lane `lane`.
template <class T, int kPer>
__global__ void moe_route_kernel(const T* __restrict__ logits, int64_t n_tokens, int n_experts, int top_k,
                                 bool renormalize, int32_t* __restrict__ ids, float* __restrict__ weights) {
  pdl_wait();
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= n_tokens) return;
  const T* row = logits + t * n_experts;
  float p[kPer];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = i * 32 + lane;
    p[i] = e < n_experts ? to_f32<T>(row[e]) : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = i * 32 + lane;
    p[i] = e < n_experts ? expf(p[i] - mx) : -1.0f;  // -1 marks "no expert": below every probability
    if (e < n_experts) sum += p[i];
  }
  const float inv_sum = 1.0f / warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kPer; ++i) p[i] = p[i] >= 0.0f ? p[i] * inv_sum : -1.0f;

  float chosen_sum = 0.0f;
  float my_weight = 0.0f;  // lane k keeps the k-th weight
  int my_id = 0;
  for (int k = 0; k < top_k; ++k) {
    float best = -2.0f;
    int best_e = INT32_MAX;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (p[i] > best) {
        best = p[i];
        best_e = i * 32 + lane;
      }  // ascending e: ties keep the lower id
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ov > best || (ov == best && oe < best_e)) {
        best = ov;
        best_e = oe;
      }
    }
    if ((best_e & 31) == lane) {
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (i * 32 + lane == best_e) p[i] = -2.0f;
    }
    if (lane == k) {
      my_weight = best;
      my_id = best_e;
    }
    chosen_sum += best;
  }
  if (lane < top_k) {
    ids[t * top_k + lane] = my_id;
    weights[t * top_k + lane] = renormalize ? my_weight / chosen_sum : my_weight;
  }
}

// kUnroll ids per thread in flight (one block streams all T·K ids, so it is load-latency bound).
constexpr int kUnroll = 4;

// e[u] = the local expert of pair base + u·blockDim.x (-1 past the end; outside [0, count) when
// another rank holds it).
__device__ __forceinline__ void local_experts(const int32_t* __restrict__ ids, int64_t n_pairs, int first, int64_t base,
                                              int (&e)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = base + static_cast<int64_t>(u) * blockDim.x;
    e[u] = p < n_pairs ? ids[p] - first : -1;
  }
}

// One block: per-expert counts in shared memory, prefix sum, then each local pair takes a row of
// its expert's segment.
__global__ void moe_permute_kernel(const int32_t* __restrict__ ids, int64_t n_pairs, int top_k, int first, int count,
                                   int32_t* __restrict__ offsets, int32_t* __restrict__ src_token,
                                   int32_t* __restrict__ pair_row, int tile_m, int32_t* __restrict__ tile_start,
                                   int32_t* __restrict__ active) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t cursor[];  // [count]
  for (int e = threadIdx.x; e < count; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
  for (int64_t base = threadIdx.x; base < n_pairs; base += step) {
    int e[kUnroll];
    local_experts(ids, n_pairs, first, base, e);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (e[u] >= 0 && e[u] < count) atomicAdd(&cursor[e[u]], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0, tiles = 0, n_active = 0;
    for (int e = 0; e < count; ++e) {
      const int32_t c = cursor[e];
      if (active && c > 0) active[1 + n_active++] = e;
      offsets[e] = run;
      cursor[e] = run;
      run += c;
      if (tile_start) {
        tile_start[e] = tiles;
        tiles += (c + tile_m - 1) / tile_m;
      }
    }
    offsets[count] = run;
    if (tile_start) tile_start[count] = tiles;
    if (active) active[0] = n_active;
  }
  __syncthreads();
  for (int64_t base = threadIdx.x; base < n_pairs; base += step) {
    int e[kUnroll];
    local_experts(ids, n_pairs, first, base, e);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + static_cast<int64_t>(u) * blockDim.x;
      if (p >= n_pairs) break;
      if (e[u] >= 0 && e[u] < count) {
        const int32_t r = atomicAdd(&cursor[e[u]], 1);
        pair_row[p] = r;
        src_token[r] = static_cast<int32_t>(p / top_k);
      } else {
        pair_row[p] = -1;
      }
    }
  }
}

// out[t] += Σ_k w[t,k] · y[row(t,k)], summed in fp32 in k order (deterministic), rounded once.
template <class TY, class TO, bool kVec>
__global__ void moe_unpermute_kernel(const TY* __restrict__ y, const float* __restrict__ w,
                                     const int32_t* __restrict__ pair_row, int top_k, TO* __restrict__ out,
                                     int64_t cols) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  TO* o = out + t * cols;
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < top_k; ++k) {
        const int32_t r = pair_row[t * top_k + k];
        if (r < 0) continue;
        const float wk = w[t * top_k + k];
        float v[8];
        load8(y + static_cast<int64_t>(r) * cols + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += wk * v[i];
      }
      float cur[8];
      load8(o + c, cur);
#pragma unroll
      for (int i = 0; i < 8; ++i) cur[i] += acc[i];
      store8(o + c, cur);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float acc = 0.0f;
      for (int k = 0; k < top_k; ++k) {
        const int32_t r = pair_row[t * top_k + k];
        if (r >= 0) acc += w[t * top_k + k] * to_f32<TY>(y[static_cast<int64_t>(r) * cols + c]);
      }
      o[c] = from_f32<TO>(to_f32<TO>(o[c]) + acc);
    }
  }
}

// ---- Small-batch expert GEMMs (decode): one launch covers every local expert, reading the
// segment offsets on the device, so no host synchronization; the grid's rows are the experts with
// rows (`active`, listed by the permute) or all of them.
// kGateUp: act[r, n] = silu(bf16(x[tok(r)] · gate[n])) · bf16(x[tok(r)] · up[n]), rounded to bf16
// like the cuBLAS path (whose GEMMs write bf16). Otherwise: y[r, n] = act[r] · down[n] in F32.

// The segment [begin, end) of grid row blockIdx.y's expert e; false when it has no rows.
__device__ __forceinline__ bool small_gemm_segment(const int32_t* offsets, const int32_t* active, int& e, int& begin,
                                                   int& end) {
  if (active && static_cast<int>(blockIdx.y) >= active[0]) return false;
  e = active ? active[1 + blockIdx.y] : static_cast<int>(blockIdx.y);
  begin = offsets[e];
  end = offsets[e + 1];
  return begin < end;
}

__device__ __forceinline__ float silu_mul_bf16(float g, float u) {
  g = to_f32(from_f32<__nv_bfloat16>(g));
  u = to_f32(from_f32<__nv_bfloat16>(u));
  return g / (1.0f + __expf(-g)) * u;
}

// 16-byte path (k_dim % 8 == 0, aligned rows): each warp streams the weight rows of kCols output
// columns (gate and up rows for gate‖up) through warp_dots (gemv.cuh: a whole pass of copies in
// flight before the first multiply), for kRows segment rows at a time; a segment of more rows
// re-reads them (from L2) per group.
constexpr int kSmallWarps = 4;
constexpr int kSmallRows = 2;
template <bool kGateUp>
__host__ __device__ constexpr int small_cols() {
  return kGateUp ? 1 : 4;
}  // two weight rows per column for gate‖up
template <bool kGateUp>
__host__ __device__ constexpr int small_cols_per_block() {
  return kSmallWarps * small_cols<kGateUp>();
}
template <bool kGateUp, int kCh>
size_t small_smem_bytes(int k_dim) {
  constexpr int kW = kGateUp ? 2 * small_cols<kGateUp>() : small_cols<kGateUp>();
  return (static_cast<size_t>(kSmallRows) * (k_dim / 8) +
          static_cast<size_t>(kSmallWarps) * warp_dots_chunks<kW, kCh>()) *
         16;
}

template <bool kGateUp, int kCh>
__global__ void __launch_bounds__(kSmallWarps * 32)
    moe_small_gemm_kernel(const __nv_bfloat16* __restrict__ in, const int32_t* __restrict__ src_token,
                          const int32_t* __restrict__ offsets, const __nv_bfloat16* const* __restrict__ w1,
                          const __nv_bfloat16* const* __restrict__ w2, int n_out, int k_dim, void* __restrict__ out,
                          const int32_t* __restrict__ active) {
  constexpr int kCols = small_cols<kGateUp>();
  constexpr int kW = kGateUp ? 2 * kCols : kCols;  // weight rows per warp: gate rows, then up rows
  extern __shared__ uint4 smem[];
  pdl_wait();  // the segments and rows come from the kernels before
  pdl_trigger();
  int e, begin, end;
  if (!small_gemm_segment(offsets, active, e, begin, end)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * small_cols_per_block<kGateUp>() + warp * kCols;
  const bool on = n0 < n_out;  // warps past n_out only join the barriers
  const int n_cols = on ? min(kCols, n_out - n0) : 1;
  const __nv_bfloat16* rows[kW];  // rows past n_out repeat the last valid one (read, never written)
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t n = min(n0 + min(c, n_cols - 1), n_out - 1);
    rows[c] = w1[e] + n * k_dim;
    if constexpr (kGateUp) rows[kCols + c] = w2[e] + n * k_dim;
  }
  uint4* const xs = smem;
  uint4* const wbuf = smem + kSmallRows * (k_dim / 8) + warp * warp_dots_chunks<kW, kCh>();
  for (int r0 = begin; r0 < end; r0 += kSmallRows) {
    const int n_rows = min(kSmallRows, end - r0);
    const __nv_bfloat16* x[kSmallRows];
#pragma unroll
    for (int r = 0; r < kSmallRows; ++r) {
      const int row = r0 + min(r, n_rows - 1);
      x[r] = in + static_cast<int64_t>(kGateUp ? src_token[row] : row) * k_dim;
    }
    if (r0 > begin) __syncthreads();  // every warp is done with the previous rows in xs
    float dot[kSmallRows][kW];
#pragma unroll
    for (int r = 0; r < kSmallRows; ++r)
#pragma unroll
      for (int c = 0; c < kW; ++c) dot[r][c] = 0.0f;
    warp_dots<kSmallRows, kW, kCh>(rows, x, xs, k_dim, lane, wbuf, on, dot);
    if (!on) continue;
#pragma unroll
    for (int r = 0; r < kSmallRows; ++r)
#pragma unroll
      for (int c = 0; c < kW; ++c) dot[r][c] = warp_sum(dot[r][c]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kSmallRows; ++r) {
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
  }
}

// Any k_dim and alignment: one element per lane and step, a warp per output column.
constexpr int kScalarWarps = 8;
template <bool kGateUp>
__global__ void __launch_bounds__(kScalarWarps * 32)
    moe_small_gemm_scalar_kernel(const __nv_bfloat16* __restrict__ in, const int32_t* __restrict__ src_token,
                                 const int32_t* __restrict__ offsets, const __nv_bfloat16* const* __restrict__ w1,
                                 const __nv_bfloat16* const* __restrict__ w2, int n_out, int k_dim,
                                 void* __restrict__ out, const int32_t* __restrict__ active) {
  pdl_wait();
  pdl_trigger();
  int e, begin, end;
  if (!small_gemm_segment(offsets, active, e, begin, end)) return;
  const int lane = threadIdx.x & 31, n = blockIdx.x * kScalarWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;
  const __nv_bfloat16* g = w1[e] + static_cast<int64_t>(n) * k_dim;
  const __nv_bfloat16* u = kGateUp ? w2[e] + static_cast<int64_t>(n) * k_dim : g;
  for (int r = begin; r < end; ++r) {
    const __nv_bfloat16* xr = in + static_cast<int64_t>(kGateUp ? src_token[r] : r) * k_dim;
    float dg = 0.0f, du = 0.0f;
    for (int k = lane; k < k_dim; k += 32) {
      const float xv = to_f32(xr[k]);
      dg += xv * to_f32(g[k]);
      if constexpr (kGateUp) du += xv * to_f32(u[k]);
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

}  // namespace

cudaError_t launch_moe_route(const DevTensor& logits, int top_k, bool renormalize, DevTensor ids, DevTensor weights,
                             cudaStream_t stream) {
  const int64_t n_tokens = logits.rows();
  const int n_experts = static_cast<int>(logits.cols());
  if (n_tokens == 0) return cudaSuccess;
  constexpr int kWarps = 4;
  const unsigned blocks = static_cast<unsigned>((n_tokens + kWarps - 1) / kWarps);
  auto* idp = ids.ptr<int32_t>();
  auto* wp = weights.ptr<float>();
  CPI_DISPATCH_ACT(logits.dtype, "moe_route logits", T, {
    const T* lp = static_cast<const T*>(logits.data);
    if (n_experts <= 128)
      launch_k(moe_route_kernel<T, 4>, blocks, kWarps * 32, 0, stream, lp, n_tokens, n_experts, top_k, renormalize, idp,
               wp);
    else if (n_experts <= 256)
      launch_k(moe_route_kernel<T, 8>, blocks, kWarps * 32, 0, stream, lp, n_tokens, n_experts, top_k, renormalize, idp,
               wp);
    else if (n_experts <= 512)
      launch_k(moe_route_kernel<T, 16>, blocks, kWarps * 32, 0, stream, lp, n_tokens, n_experts, top_k, renormalize,
               idp, wp);
    else
      launch_k(moe_route_kernel<T, 32>, blocks, kWarps * 32, 0, stream, lp, n_tokens, n_experts, top_k, renormalize,
               idp, wp);
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_permute_tiled(const DevTensor& ids, int first, int count, int32_t* offsets, int32_t* src_token,
                                     int32_t* pair_row, int tile_m, int32_t* tile_start, cudaStream_t stream,
                                     int32_t* active) {
  const int64_t n_pairs = ids.numel();
  const int top_k = static_cast<int>(ids.cols());
  if (tile_start && tile_m <= 0) return cudaErrorInvalidValue;
  launch_k(moe_permute_kernel, 1, 1024, static_cast<size_t>(count) * sizeof(int32_t), stream, ids.ptr<const int32_t>(),
           n_pairs, top_k, first, count, offsets, src_token, pair_row, tile_m, tile_start, active);
  return cudaGetLastError();
}

cudaError_t launch_moe_permute(const DevTensor& ids, int first, int count, int32_t* offsets, int32_t* src_token,
                               int32_t* pair_row, cudaStream_t stream) {
  return launch_moe_permute_tiled(ids, first, count, offsets, src_token, pair_row, 0, nullptr, stream);
}

cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const int32_t* pair_row, DevTensor out,
                                 cudaStream_t stream) {
  const int64_t n_tokens = out.rows(), cols = out.cols();
  const int top_k = static_cast<int>(weights.cols());
  if (n_tokens == 0 || cols == 0) return cudaSuccess;
  const bool vec = cols % 8 == 0 && aligned16(y.data) && aligned16(out.data);
  const int64_t units = vec ? cols / 8 : cols;
  const int threads = units >= 256 ? 256 : static_cast<int>(((units + 31) / 32) * 32);
  CPI_DISPATCH_ACT(y.dtype, "moe y", TY, CPI_DISPATCH_ACT(out.dtype, "moe out", TO, {
                     auto* yp = static_cast<const TY*>(y.data);
                     auto* op = static_cast<TO*>(out.data);
                     const float* wp = weights.ptr<const float>();
                     if (vec)
                       launch_k(moe_unpermute_kernel<TY, TO, true>, n_tokens, threads, 0, stream, yp, wp, pair_row,
                                top_k, op, cols);
                     else
                       launch_k(moe_unpermute_kernel<TY, TO, false>, n_tokens, threads, 0, stream, yp, wp, pair_row,
                                top_k, op, cols);
                   }));
  return cudaGetLastError();
}

cudaError_t launch_moe_rowwise_gemms(const DevTensor& x, const int32_t* src_token, const int32_t* offsets, int count,
                                     const void* const* gate, const void* const* up, const void* const* down,
                                     int64_t inter, bool vectorized, void* act, float* y, cudaStream_t stream,
                                     const int32_t* active, int max_active) {
  const int64_t hidden = x.cols();
  if (count == 0) return cudaSuccess;
  if (count > 65535 || (vectorized && (hidden % 8 != 0 || inter % 8 != 0))) return cudaErrorInvalidValue;
  if (active && (max_active < 1 || max_active > count)) return cudaErrorInvalidValue;
  const int experts = active ? max_active : count;  // grid rows
  const auto* xp = x.ptr<const __nv_bfloat16>();
  auto* g = reinterpret_cast<const __nv_bfloat16* const*>(gate);
  auto* u = reinterpret_cast<const __nv_bfloat16* const*>(up);
  auto* d = reinterpret_cast<const __nv_bfloat16* const*>(down);
  const auto* actp = static_cast<const __nv_bfloat16*>(act);
  const int n_i = static_cast<int>(inter), n_h = static_cast<int>(hidden);
  const unsigned ey = static_cast<unsigned>(experts);
  if (!vectorized) {
    const dim3 grid1(static_cast<unsigned>((inter + kScalarWarps - 1) / kScalarWarps), ey);
    const dim3 grid2(static_cast<unsigned>((hidden + kScalarWarps - 1) / kScalarWarps), ey);
    launch_k(moe_small_gemm_scalar_kernel<true>, grid1, kScalarWarps * 32, 0, stream, xp, src_token, offsets, g, u, n_i,
             n_h, act, active);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    launch_k(moe_small_gemm_scalar_kernel<false>, grid2, kScalarWarps * 32, 0, stream, actp, nullptr, offsets, d,
             nullptr, n_h, n_i, y, active);
    return cudaGetLastError();
  }
  // One pass of 256 · kCh elements per weight row: kCh = 4 for rows up to 1024 (down at I = 768),
  // else 8 (a longer row takes several passes).
  auto go = [&](auto kernel, size_t smem, unsigned grid_x, const __nv_bfloat16* src, const __nv_bfloat16* const* a1,
                const __nv_bfloat16* const* a2, int n_out, int k_dim, void* o) {
    return launch_k(kernel, dim3(grid_x, ey), kSmallWarps * 32, smem, stream, src, src_token, offsets, a1, a2, n_out,
                    k_dim, o, active);
  };
  const unsigned gx1 = static_cast<unsigned>((inter + small_cols_per_block<true>() - 1) / small_cols_per_block<true>());
  const unsigned gx2 =
      static_cast<unsigned>((hidden + small_cols_per_block<false>() - 1) / small_cols_per_block<false>());
  cudaError_t err =
      hidden <= 1024 ? go(moe_small_gemm_kernel<true, 4>, small_smem_bytes<true, 4>(n_h), gx1, xp, g, u, n_i, n_h, act)
                     : go(moe_small_gemm_kernel<true, 8>, small_smem_bytes<true, 8>(n_h), gx1, xp, g, u, n_i, n_h, act);
  if (err != cudaSuccess) return err;
  return inter <= 1024
             ? go(moe_small_gemm_kernel<false, 4>, small_smem_bytes<false, 4>(n_i), gx2, actp, d, nullptr, n_h, n_i, y)
             : go(moe_small_gemm_kernel<false, 8>, small_smem_bytes<false, 8>(n_i), gx2, actp, d, nullptr, n_h, n_i, y);
}

cudaError_t launch_moe_small_gemms(const DevTensor& x, const int32_t* src_token, const int32_t* offsets, int count,
                                   const void* const* gate, const void* const* up, const void* const* down,
                                   int64_t inter, void* act, float* y, cudaStream_t stream) {
  return launch_moe_rowwise_gemms(x, src_token, offsets, count, gate, up, down, inter, true, act, y, stream);
}

}  // namespace cpinfer::cuda
