// MoE kernels: the router (softmax + top-k per token, one warp per token; at decode sizes with the
// router's product in the same kernel), the counting sort that groups (token, k) pairs by local
// expert (and the per-expert M-tile prefix sum the grouped GEMMs of moe_gemm.cu schedule from), and
// the weighted un-permute into the output. The expert GEMMs of
// small batches and odd shapes are moe_rowwise.cu's.
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

// Softmax over the n_experts logits of one token, top_k of it (ties to the lower id), by one warp:
// kPer values per lane, expert e = i * 32 + lane in p[i] of lane `lane`. load(e) reads logit e as
// fp32. Lane k < top_k writes the k-th choice to ids[k], weights[k].
template <int kPer, class Load>
__device__ __forceinline__ void route_one(const Load& load, int n_experts, int top_k, bool renormalize, int lane,
                                          int32_t* __restrict__ ids, float* __restrict__ weights) {
  float p[kPer];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = i * 32 + lane;
    p[i] = e < n_experts ? load(e) : -INFINITY;
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
    ids[lane] = my_id;
    weights[lane] = renormalize ? my_weight / chosen_sum : my_weight;
  }
}

// One warp per token.
template <class T, int kPer>
__global__ void moe_route_kernel(const T* __restrict__ logits, int64_t n_tokens, int n_experts, int top_k,
                                 bool renormalize, int32_t* __restrict__ ids, float* __restrict__ weights) {
  pdl_wait();
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= n_tokens) return;
  const T* row = logits + t * n_experts;
  route_one<kPer>([&](int e) { return to_f32<T>(row[e]); }, n_experts, top_k, renormalize, lane, ids + t * top_k,
                  weights + t * top_k);
}

// The router of a decode step in one kernel (launch_moe_gate): warp w of block b computes the logit
// of expert b · kGateWarps + w for the M <= kSkinnyMaxRows rows (gemv.cuh's weight passes: the
// router's rows are read before the previous kernel ends), writes it to logits [M, E] F32, and the
// block that finishes last (a ticket counter, back to 0 after it) routes the M rows from them.
constexpr int kGateWarps = 4;
constexpr int kGateCh = 8;  // a pass: 8 chunks of 16 bytes per lane, one BF16 row of 2048

template <int M, int kPer>
__global__ void __launch_bounds__(kGateWarps * 32)
    moe_gate_kernel(const __nv_bfloat16* __restrict__ x, int m, int k, const __nv_bfloat16* __restrict__ router,
                    int n_experts, int top_k, bool renormalize, float* __restrict__ logits,
                    unsigned* __restrict__ ticket, int32_t* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ uint4 smem[];
  __shared__ bool last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e = static_cast<int>(blockIdx.x) * kGateWarps + warp;
  const bool active = e < n_experts;
  WeightRows<1> wr;
  wr.template set<Bf16Weights>(0, router, nullptr, min(e, n_experts - 1), k);
  const __nv_bfloat16* xr[M];
#pragma unroll
  for (int r = 0; r < M; ++r) xr[r] = x + static_cast<int64_t>(min(r, m - 1)) * k;
  float dot[M][1];
#pragma unroll
  for (int r = 0; r < M; ++r) dot[r][0] = 0.0f;
  warp_dots<Bf16Weights, M, 1, kGateCh>(
      wr, xr, smem, k, lane, smem + M * (k / 8) + warp * warp_dots_chunks<Bf16Weights, 1, kGateCh>(), active, dot);
#pragma unroll
  for (int r = 0; r < M; ++r) dot[r][0] = warp_sum(dot[r][0]);
  if (active && lane == 0) {
#pragma unroll
    for (int r = 0; r < M; ++r)
      if (r < m) logits[static_cast<int64_t>(r) * n_experts + e] = dot[r][0];
    __threadfence();  // the logits before the ticket
  }
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // every block's logits are visible (L2: read with __ldcg)
  if (warp < m) {
    const float* row = logits + static_cast<int64_t>(warp) * n_experts;
    route_one<kPer>([&](int i) { return __ldcg(row + i); }, n_experts, top_k, renormalize, lane, ids + warp * top_k,
                    weights + warp * top_k);
  }
  if (threadIdx.x == 0) *ticket = 0u;  // for the next launch (stream-ordered after this one)
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

// Where pair p's row of y is: pair_row[p] (after a permute), or, without a permute, p itself when its
// expert ids[p] is local; -1: none here.
struct PairRows {
  const int32_t* pair_row;
  const int32_t* ids;
  int first, count;
  __device__ __forceinline__ int32_t operator()(int64_t p) const {
    if (pair_row) return pair_row[p];
    const int32_t e = ids[p] - first;
    return e >= 0 && e < count ? static_cast<int32_t>(p) : -1;
  }
};

// out[t] = Σ_k w[t,k] · y[row(t,k)], summed in fp32 in k order (deterministic), rounded once; 0
// for a token with no local pair.
template <class TY, class TO, bool kVec>
__global__ void moe_unpermute_kernel(const TY* __restrict__ y, const float* __restrict__ w, const PairRows pair_row,
                                     int top_k, TO* __restrict__ out, int64_t cols) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  TO* o = out + t * cols;
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < top_k; ++k) {
        const int32_t r = pair_row(t * top_k + k);
        if (r < 0) continue;
        const float wk = w[t * top_k + k];
        float v[8];
        load8(y + static_cast<int64_t>(r) * cols + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += wk * v[i];
      }
      store8(o + c, acc);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float acc = 0.0f;
      for (int k = 0; k < top_k; ++k) {
        const int32_t r = pair_row(t * top_k + k);
        if (r >= 0) acc += w[t * top_k + k] * to_f32<TY>(y[static_cast<int64_t>(r) * cols + c]);
      }
      o[c] = from_f32<TO>(acc);
    }
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

bool moe_gate_supported(const DevTensor& x, const DevTensor& router, int top_k) {
  const int64_t k = x.cols();
  return x.dtype == DType::BF16 && router.dtype == DType::BF16 && x.ndim == 2 && router.ndim == 2 && x.rows() >= 1 &&
         x.rows() <= kSkinnyMaxRows && x.rows() <= kGateWarps && k == router.cols() && k % 8 == 0 && k > 0 &&
         k <= 16384 && router.dim(0) >= 1 && router.dim(0) <= 1024 && top_k >= 1 && top_k <= 32 &&
         top_k <= router.dim(0) && aligned16(x.data) && aligned16(router.data);
}

cudaError_t launch_moe_gate(const DevTensor& x, const DevTensor& router, int top_k, bool renormalize, DevTensor logits,
                            unsigned* ticket, DevTensor ids, DevTensor weights, cudaStream_t stream) {
  if (!moe_gate_supported(x, router, top_k) || ticket == nullptr) return cudaErrorInvalidValue;
  const int m = static_cast<int>(x.rows()), k = static_cast<int>(x.cols()), n = static_cast<int>(router.dim(0));
  const unsigned grid = static_cast<unsigned>((n + kGateWarps - 1) / kGateWarps);
  const auto* xp = x.ptr<const __nv_bfloat16>();
  const auto* wp = router.ptr<const __nv_bfloat16>();
  auto* lp = logits.ptr<float>();
  auto* idp = ids.ptr<int32_t>();
  auto* wtp = weights.ptr<float>();
  auto go = [&](auto kernel, int rows) {
    const size_t smem =
        (static_cast<size_t>(rows) * k / 8 + size_t{kGateWarps} * warp_dots_chunks<Bf16Weights, 1, kGateCh>()) * 16;
    return launch_k(kernel, grid, kGateWarps * 32, smem, stream, xp, m, k, wp, n, top_k, renormalize, lp, ticket, idp,
                    wtp);
  };
  static_assert(kSkinnyMaxRows == 2, "instantiate moe_gate_kernel for the row counts up to kSkinnyMaxRows");
  auto by_rows = [&](auto per) {
    constexpr int kPer = decltype(per)::value;
    return m == 1 ? go(moe_gate_kernel<1, kPer>, 1) : go(moe_gate_kernel<2, kPer>, 2);
  };
  cudaError_t err;
  if (n <= 128)
    err = by_rows(std::integral_constant<int, 4>{});
  else if (n <= 256)
    err = by_rows(std::integral_constant<int, 8>{});
  else if (n <= 512)
    err = by_rows(std::integral_constant<int, 16>{});
  else
    err = by_rows(std::integral_constant<int, 32>{});
  return err != cudaSuccess ? err : cudaGetLastError();
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

namespace {
cudaError_t unpermute(const DevTensor& y, const DevTensor& weights, const PairRows& pair_row, DevTensor out,
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
}  // namespace

cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const int32_t* pair_row, DevTensor out,
                                 cudaStream_t stream) {
  return unpermute(y, weights, PairRows{pair_row, nullptr, 0, 0}, out, stream);
}

cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const MoeRowSource& rows, int count,
                                 DevTensor out, cudaStream_t stream) {
  if (rows.ids == nullptr && rows.pair_row == nullptr) return cudaErrorInvalidValue;
  return unpermute(y, weights, PairRows{rows.ids ? nullptr : rows.pair_row, rows.ids, rows.first, count}, out, stream);
}

}  // namespace cpinfer::cuda
