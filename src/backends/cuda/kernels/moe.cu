// MoE kernels: the router (softmax + top-k per token, one warp per token; at decode sizes with the
// router's product in the same kernel), the counting sort that groups (token, k) pairs by local
// expert (and the per-expert M-tile prefix sum the grouped GEMMs of moe_gemm.cu schedule from), and
// the weighted un-permute into the output. The expert GEMMs of
// small batches and odd shapes are moe_rowwise.cu's.
#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/norm.cuh"

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

// kNorm (TW: the norm weight's dtype): x is the addend of a residual add + RMSNorm whose output
// rows are the ones routed: every block forms them from residual + x into its shared memory
// (norm.cuh, rms_norm_kernel's order, its block size played by these 128 threads), and the block
// that routes also writes the residual and the normed rows (every block has read the residual by
// then: its ticket comes after).
template <int M, int kPer, bool kNorm, class TW>
__global__ void __launch_bounds__(kGateWarps * 32)
    moe_gate_kernel(const __nv_bfloat16* __restrict__ x, int m, int k, const __nv_bfloat16* __restrict__ router,
                    int n_experts, int top_k, bool renormalize, float* __restrict__ logits,
                    unsigned* __restrict__ ticket, int32_t* __restrict__ ids, float* __restrict__ weights,
                    __nv_bfloat16* __restrict__ residual, const TW* __restrict__ norm_w,
                    __nv_bfloat16* __restrict__ normed, float eps) {
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
  uint4* const wbuf = smem + M * (k / 8) + warp * warp_dots_chunks<Bf16Weights, 1, kGateCh>();
  const int64_t units = k / 8;
  // kNorm: the rounded sums residual + x in vs (after the warps' buffers), xs as the copies lay it
  // out, the norm weights after them (copied before the wait: they are constant).
  uint4* const vs = smem + M * units + kGateWarps * warp_dots_chunks<Bf16Weights, 1, kGateCh>();
  TW* const ws = reinterpret_cast<TW*>(vs + M * units);
  if constexpr (kNorm) {
    for (int64_t i = threadIdx.x; i < units * static_cast<int64_t>(sizeof(TW)) / 2; i += blockDim.x)
      reinterpret_cast<uint4*>(ws)[i] = reinterpret_cast<const uint4*>(norm_w)[i];
    // The rows residual + x into vs, then normed into xs (chunk c of row r at [r * units + c]).
    warp_dots_staged<Bf16Weights, M, 1, kGateCh>(
        wr,
        [&](uint4* xs) {
#pragma unroll
          for (int r = 0; r < M; ++r) {
            const __nv_bfloat16* rr = residual + static_cast<int64_t>(min(r, m - 1)) * k;
            const float inv =
                rms_inverse(row_sum_squares(units, row_threads(units),
                                            [&](int64_t u, float& ss) {
                                              float v[8];
                                              load8(xr[r] + u * 8, v);
                                              residual_sum8(rr + u * 8, v);
                                              store8(reinterpret_cast<__nv_bfloat16*>(vs + r * units + u), v);
                                              add_squares8(ss, v);
                                            }),
                            k, eps);
            for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
              float v[8];
              load8(reinterpret_cast<const __nv_bfloat16*>(vs + r * units + u), v);
              norm_store8(reinterpret_cast<__nv_bfloat16*>(xs + r * units + u), v, ws + u * 8, inv);
            }
          }
        },
        smem, k, lane, wbuf, active, dot);
  } else {
    warp_dots<Bf16Weights, M, 1, kGateCh>(wr, xr, smem, k, lane, wbuf, active, dot);
  }
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
  if constexpr (kNorm) {
    for (int r = 0; r < m && r < M; ++r) {
      const int64_t off = static_cast<int64_t>(r) * k;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        reinterpret_cast<uint4*>(residual + off)[u] = vs[r * units + u];
        reinterpret_cast<uint4*>(normed + off)[u] = smem[r * units + u];
      }
    }
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

// Pair p, of local expert e (outside [0, count): another rank's), takes the next row of its
// expert's segment from cursor (pair_row[p] = r, src_token[r] = its token), or pair_row[p] = -1.
__device__ __forceinline__ void place_pair(int64_t p, int e, int count, int top_k, int32_t* cursor,
                                           int32_t* __restrict__ pair_row, int32_t* __restrict__ src_token) {
  if (e >= 0 && e < count) {
    const int32_t r = atomicAdd(&cursor[e], 1);
    pair_row[p] = r;
    src_token[r] = static_cast<int32_t>(p / top_k);
  } else {
    pair_row[p] = -1;
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
      place_pair(p, e[u], count, top_k, cursor, pair_row, src_token);
    }
  }
}

// Prefill-sized permutes (more than kPermuteOneBlockPairs pairs) over many blocks, each taking
// `chunk` consecutive pairs (kPermuteChunk, or more where that would make more than
// kPermuteMaxBlocks blocks: each block reads every block's counts). moe_permute_count_kernel
// writes each block's per-expert counts (block_counts [blocks][count]); moe_permute_scatter_kernel
// then gives each block its experts' starts (the segment's offset plus the counts of the blocks
// before it), and the block's pairs take rows from there. The one-block kernel above streamed all
// T·K pairs twice through one SM (H100, 32K tokens, top-8: 195 µs a layer; the two kernels 14 µs).
constexpr int kPermuteThreads = 256;
constexpr int kPermuteChunk = 2048;  // pairs per block, at least
constexpr int64_t kPermuteMaxBlocks = 256;
constexpr int64_t kPermuteOneBlockPairs = 2 * kPermuteChunk;

constexpr int64_t permute_blocks(int64_t n_pairs) {
  return std::min<int64_t>((n_pairs + kPermuteChunk - 1) / kPermuteChunk, kPermuteMaxBlocks);
}
constexpr int64_t permute_chunk(int64_t n_pairs) {
  const int64_t b = permute_blocks(n_pairs);
  return (n_pairs + b - 1) / b;
}

__global__ void __launch_bounds__(kPermuteThreads)
    moe_permute_count_kernel(const int32_t* __restrict__ ids, int64_t n_pairs, int64_t chunk, int first, int count,
                             int32_t* __restrict__ block_counts) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t hist[];  // [count]
  for (int e = threadIdx.x; e < count; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = min(begin + chunk, n_pairs);
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const int e = ids[p] - first;
    if (e >= 0 && e < count) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < count; e += blockDim.x)
    block_counts[static_cast<int64_t>(blockIdx.x) * count + e] = hist[e];
}

__global__ void __launch_bounds__(kPermuteThreads)
    moe_permute_scatter_kernel(const int32_t* __restrict__ ids, int64_t n_pairs, int64_t chunk, int top_k, int first,
                               int count, const int32_t* __restrict__ block_counts, int32_t* __restrict__ offsets,
                               int32_t* __restrict__ src_token, int32_t* __restrict__ pair_row, int tile_m,
                               int32_t* __restrict__ tile_start, int32_t* __restrict__ active) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ int32_t sm[];
  int32_t* const cursor = sm;         // [count]: the block's next row of each expert
  int32_t* const total = sm + count;  // [count]: the expert's rows over all blocks
  const int blocks = gridDim.x, b = blockIdx.x;
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    int32_t before = 0, all = 0;
    for (int i = 0; i < blocks; ++i) {
      const int32_t c = block_counts[static_cast<int64_t>(i) * count + e];
      before += i < b ? c : 0;
      all += c;
    }
    cursor[e] = before;
    total[e] = all;
  }
  __syncthreads();
  // Warp 0 scans the totals in expert order, 32 at a time: the segment offsets (added to the
  // cursors), and in block 0 the outputs: offsets, tile_start, active.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int32_t run = 0, tiles = 0, n_active = 0;
    for (int e0 = 0; e0 < count; e0 += 32) {
      const int e = e0 + lane;
      const int32_t c = e < count ? total[e] : 0;
      const int32_t nt = tile_start != nullptr && tile_m > 0 ? (c + tile_m - 1) / tile_m : 0;
      int32_t inc_c = c, inc_t = nt;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int32_t uc = __shfl_up_sync(0xffffffffu, inc_c, o), ut = __shfl_up_sync(0xffffffffu, inc_t, o);
        if (lane >= o) {
          inc_c += uc;
          inc_t += ut;
        }
      }
      const unsigned has = __ballot_sync(0xffffffffu, c > 0);
      if (e < count) {
        const int32_t off = run + inc_c - c;
        cursor[e] += off;
        if (b == 0) {
          offsets[e] = off;
          if (tile_start != nullptr) tile_start[e] = tiles + inc_t - nt;
          if (active != nullptr && c > 0) active[1 + n_active + __popc(has & ((1u << lane) - 1u))] = e;
        }
      }
      run += __shfl_sync(0xffffffffu, inc_c, 31);
      tiles += __shfl_sync(0xffffffffu, inc_t, 31);
      n_active += __popc(has);
    }
    if (b == 0 && lane == 0) {
      offsets[count] = run;
      if (tile_start != nullptr) tile_start[count] = tiles;
      if (active != nullptr) active[0] = n_active;
    }
  }
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(b) * chunk;
  const int64_t end = min(begin + chunk, n_pairs);
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x)
    place_pair(p, ids[p] - first, count, top_k, cursor, pair_row, src_token);
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
// for a token with no local pair. The token's rows and weights are staged in shared memory first
// (dynamic, 8 bytes per pair), so that a unit's y loads depend on nothing; decode-sized calls
// (kBatch 4) issue them 4 at a time (the chain's latency), prefill ones one at a time (kBatch 1:
// ~32 registers, the blocks an SM holds; 8 at a time took ~95 and slowed prefill down).
// kNorm (decode sizes): the rounded sum goes into the residual add + RMSNorm (RowAddNorm) instead
// of out; the block then has row_threads(units) threads, rms_norm_kernel's, and lets the next
// kernel launch only once the sums are formed: launched at the start, the next projection's weight
// prefetch competed with the sums' loads (H100, 2026-12-06: FP8 batch 1 2.93-2.94 against
// 2.96 ms a step, BF16 3.52 against 3.48).
template <int kBatch, class TY>
__device__ __forceinline__ void unpermute_sum8(const TY* __restrict__ y, const int32_t* row, const float* wt, int top_k,
                                               int64_t cols, int64_t c, float (&acc)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  for (int k0 = 0; k0 < top_k; k0 += kBatch) {
    float v[kBatch][8];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int32_t r = k0 + j < top_k ? row[k0 + j] : -1;
      if (r >= 0) load8(y + static_cast<int64_t>(r) * cols + c, v[j]);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (k0 + j >= top_k || row[k0 + j] < 0) continue;
      const float wk = wt[k0 + j];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += wk * v[j][i];
    }
  }
}
template <class TY>
__device__ __forceinline__ float unpermute_sum1(const TY* __restrict__ y, const int32_t* row, const float* wt,
                                                int top_k, int64_t cols, int64_t c) {
  float acc = 0.0f;
  for (int k = 0; k < top_k; ++k)
    if (row[k] >= 0) acc += wt[k] * to_f32<TY>(y[static_cast<int64_t>(row[k]) * cols + c]);
  return acc;
}

// Shared memory of moe_unpermute_kernel, in 16-byte units: with the norm, its weights and the row of
// sums (residual + Σ); then the token's pair rows and weights.
template <class T>
__host__ __device__ constexpr int64_t row_chunks16(int64_t cols) {
  return (cols * static_cast<int64_t>(sizeof(T)) + 15) / 16;
}
template <class TO, class TW>
__host__ __device__ constexpr int64_t unpermute_norm_smem16(int64_t cols) {
  return row_chunks16<TW>(cols) + row_chunks16<TO>(cols);
}

template <class TY, class TO, class TW, bool kVec, bool kNorm, int kBatch>
__global__ void __launch_bounds__(1024)
    moe_unpermute_kernel(const TY* __restrict__ y, const float* __restrict__ w, const PairRows pair_row, int top_k,
                         TO* __restrict__ out, int64_t cols, TO* __restrict__ residual, const TW* __restrict__ norm_w,
                         TO* __restrict__ normed, float eps) {
  extern __shared__ uint4 unpermute_smem[];
  const int64_t norm16 = kNorm ? unpermute_norm_smem16<TO, TW>(cols) : 0;
  int32_t* const row = reinterpret_cast<int32_t*>(unpermute_smem + norm16);
  float* const wt = reinterpret_cast<float*>(row + top_k);
  TW* const wsm = reinterpret_cast<TW*>(unpermute_smem);
  TO* const vsm = reinterpret_cast<TO*>(unpermute_smem + row_chunks16<TW>(cols));
  if constexpr (kNorm) {  // the norm weights are constant: copied before the wait
    if constexpr (kVec) {
      for (int64_t i = threadIdx.x; i < cols * static_cast<int64_t>(sizeof(TW)) / 16; i += blockDim.x)
        reinterpret_cast<uint4*>(wsm)[i] = reinterpret_cast<const uint4*>(norm_w)[i];
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) wsm[c] = norm_w[c];
    }
  }
  pdl_wait();
  if constexpr (!kNorm) pdl_trigger();
  const int64_t t = blockIdx.x;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    row[k] = pair_row(t * top_k + k);
    wt[k] = w[t * top_k + k];
  }
  __syncthreads();
  if constexpr (kNorm) {
    // Pass 1 writes the residual and keeps the row in shared memory; pass 2 norms it from there.
    TO* rr = residual + t * cols;
    TO* hr = normed + t * cols;
    const int64_t units = kVec ? cols / 8 : cols;
    const float inv = rms_inverse(
        row_sum_squares(units, static_cast<int>(blockDim.x),
                        [&](int64_t u, float& ss) {
                          if constexpr (kVec) {
                            float v[8];
                            unpermute_sum8<kBatch, TY>(y, row, wt, top_k, cols, u * 8, v);
#pragma unroll
                            for (int i = 0; i < 8; ++i) v[i] = to_f32<TO>(from_f32<TO>(v[i]));
                            residual_sum8(rr + u * 8, v);
                            store8(rr + u * 8, v);
                            store8(vsm + u * 8, v);
                            add_squares8(ss, v);
                          } else {
                            float v = to_f32<TO>(from_f32<TO>(unpermute_sum1<TY>(y, row, wt, top_k, cols, u)));
                            v = residual_sum1(rr + u, v);
                            rr[u] = from_f32<TO>(v);
                            vsm[u] = from_f32<TO>(v);
                            ss += v * v;
                          }
                        }),
        cols, eps);
    pdl_trigger();
    if constexpr (kVec) {
      for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
        float v[8];
        load8(vsm + c, v);
        norm_store8(hr + c, v, wsm + c, inv);
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) norm_store1(hr + c, to_f32<TO>(vsm[c]), wsm + c, inv);
    }
    return;
  }
  TO* o = out + t * cols;
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float acc[8];
      unpermute_sum8<kBatch, TY>(y, row, wt, top_k, cols, c, acc);
      store8(o + c, acc);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      o[c] = from_f32<TO>(unpermute_sum1<TY>(y, row, wt, top_k, cols, c));
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

bool moe_gate_norm_supported(const DevTensor& x, const RowAddNorm& norm) {
  const int64_t m = x.rows(), k = x.cols();
  auto same = [&](const DevTensor& t) { return t.dtype == DType::BF16 && t.rows() == m && t.cols() == k; };
  return same(norm.residual) && same(norm.out) && norm.w.numel() == k &&
         (norm.w.dtype == DType::F32 || norm.w.dtype == DType::BF16 || norm.w.dtype == DType::F16) &&
         aligned16(norm.residual.data) && aligned16(norm.out.data) && aligned16(norm.w.data);
}

cudaError_t launch_moe_gate(const DevTensor& x, const DevTensor& router, int top_k, bool renormalize, DevTensor logits,
                            unsigned* ticket, DevTensor ids, DevTensor weights, cudaStream_t stream,
                            const RowAddNorm* norm) {
  if (!moe_gate_supported(x, router, top_k) || ticket == nullptr || (norm && !moe_gate_norm_supported(x, *norm)))
    return cudaErrorInvalidValue;
  const int m = static_cast<int>(x.rows()), k = static_cast<int>(x.cols()), n = static_cast<int>(router.dim(0));
  const unsigned grid = static_cast<unsigned>((n + kGateWarps - 1) / kGateWarps);
  const auto* xp = x.ptr<const __nv_bfloat16>();
  const auto* wp = router.ptr<const __nv_bfloat16>();
  auto* lp = logits.ptr<float>();
  auto* idp = ids.ptr<int32_t>();
  auto* wtp = weights.ptr<float>();
  auto* rp = norm ? norm->residual.ptr<__nv_bfloat16>() : nullptr;
  auto* hp = norm ? norm->out.ptr<__nv_bfloat16>() : nullptr;
  const float eps = norm ? norm->eps : 0.0f;
  auto go = [&](auto kernel, int rows, const auto* nw) {
    // With the norm: the sums (as many chunks as the rows) and the norm weights too.
    const size_t smem = (static_cast<size_t>(rows) * k / 8 * (norm ? 2 : 1) +
                         size_t{kGateWarps} * warp_dots_chunks<Bf16Weights, 1, kGateCh>()) *
                            16 +
                        (norm ? static_cast<size_t>(k) * dtype_size(norm->w.dtype) : 0);
    return launch_k(kernel, grid, kGateWarps * 32, smem, stream, xp, m, k, wp, n, top_k, renormalize, lp, ticket, idp,
                    wtp, rp, nw, hp, eps);
  };
  static_assert(kSkinnyMaxRows == 2, "instantiate moe_gate_kernel for the row counts up to kSkinnyMaxRows");
  auto by_rows = [&](auto per) -> cudaError_t {
    constexpr int kPer = decltype(per)::value;
    if (norm == nullptr) {
      const float* none = nullptr;
      return m == 1 ? go(moe_gate_kernel<1, kPer, false, float>, 1, none)
                    : go(moe_gate_kernel<2, kPer, false, float>, 2, none);
    }
    CPI_DISPATCH_FLOAT(norm->w.dtype, "moe_gate norm weight", TW, {
      const auto* nw = norm->w.ptr<const TW>();
      return m == 1 ? go(moe_gate_kernel<1, kPer, true, TW>, 1, nw) : go(moe_gate_kernel<2, kPer, true, TW>, 2, nw);
    });
    return cudaErrorInvalidValue;
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
                                     int32_t* active, int32_t* block_counts) {
  const int64_t n_pairs = ids.numel();
  const int top_k = static_cast<int>(ids.cols());
  if (tile_start && tile_m <= 0) return cudaErrorInvalidValue;
  if (block_counts == nullptr || n_pairs <= kPermuteOneBlockPairs) {
    launch_k(moe_permute_kernel, 1, 1024, static_cast<size_t>(count) * sizeof(int32_t), stream,
             ids.ptr<const int32_t>(), n_pairs, top_k, first, count, offsets, src_token, pair_row, tile_m, tile_start,
             active);
    return cudaGetLastError();
  }
  const auto grid = static_cast<unsigned>(permute_blocks(n_pairs));
  const int64_t chunk = permute_chunk(n_pairs);
  launch_k(moe_permute_count_kernel, grid, kPermuteThreads, static_cast<size_t>(count) * sizeof(int32_t), stream,
           ids.ptr<const int32_t>(), n_pairs, chunk, first, count, block_counts);
  launch_k(moe_permute_scatter_kernel, grid, kPermuteThreads, 2 * static_cast<size_t>(count) * sizeof(int32_t), stream,
           ids.ptr<const int32_t>(), n_pairs, chunk, top_k, first, count, static_cast<const int32_t*>(block_counts),
           offsets, src_token, pair_row, tile_m, tile_start, active);
  return cudaGetLastError();
}

int64_t moe_permute_scratch_ints(int64_t n_pairs, int count) {
  return n_pairs > kPermuteOneBlockPairs ? permute_blocks(n_pairs) * count : 0;
}

cudaError_t launch_moe_permute(const DevTensor& ids, int first, int count, int32_t* offsets, int32_t* src_token,
                               int32_t* pair_row, cudaStream_t stream) {
  return launch_moe_permute_tiled(ids, first, count, offsets, src_token, pair_row, 0, nullptr, stream);
}

namespace {
cudaError_t unpermute(const DevTensor& y, const DevTensor& weights, const PairRows& pair_row, DevTensor out,
                      cudaStream_t stream, const RowAddNorm* norm) {
  const int64_t n_tokens = out.rows(), cols = out.cols();
  const int top_k = static_cast<int>(weights.cols());
  if (n_tokens == 0 || cols == 0) return cudaSuccess;
  if (norm != nullptr &&
      (n_tokens > kUnpermuteDecodeTokens || norm->residual.dtype != out.dtype || norm->out.dtype != out.dtype ||
       norm->residual.rows() != n_tokens || norm->residual.cols() != cols || norm->out.rows() != n_tokens ||
       norm->out.cols() != cols || norm->w.numel() != cols))
    return cudaErrorInvalidValue;
  const bool vec = cols % 8 == 0 && aligned16(y.data) &&
                   (norm ? aligned16(norm->residual.data) && aligned16(norm->out.data) && aligned16(norm->w.data)
                         : aligned16(out.data));
  const int64_t units = vec ? cols / 8 : cols;
  // With the norm, rms_norm_kernel's block size (its sums' order); else up to 256 threads.
  const int threads = norm ? row_threads(units) : (units >= 256 ? 256 : static_cast<int>(((units + 31) / 32) * 32));
  const float* wp = weights.ptr<const float>();
  const size_t pair_bytes = static_cast<size_t>(top_k) * 8;  // the token's rows and weights
  const bool decode = n_tokens <= kUnpermuteDecodeTokens;
  CPI_DISPATCH_ACT(y.dtype, "moe y", TY, CPI_DISPATCH_ACT(out.dtype, "moe out", TO, {
                     auto* yp = static_cast<const TY*>(y.data);
                     if (norm == nullptr) {
                       auto* op = static_cast<TO*>(out.data);
                       auto go = [&](auto kernel) {
                         launch_k(kernel, n_tokens, threads, pair_bytes, stream, yp, wp, pair_row, top_k, op, cols,
                                  nullptr, static_cast<const float*>(nullptr), nullptr, 0.0f);
                       };
                       if (vec && decode)
                         go(moe_unpermute_kernel<TY, TO, float, true, false, 4>);
                       else if (vec)
                         go(moe_unpermute_kernel<TY, TO, float, true, false, 1>);
                       else
                         go(moe_unpermute_kernel<TY, TO, float, false, false, 1>);
                     } else {
                       CPI_DISPATCH_FLOAT(norm->w.dtype, "moe norm weight", TW, {
                         auto* rp = static_cast<TO*>(norm->residual.data);
                         auto* hp = static_cast<TO*>(norm->out.data);
                         auto* nw = static_cast<const TW*>(norm->w.data);
                         const size_t smem = static_cast<size_t>(unpermute_norm_smem16<TO, TW>(cols)) * 16 + pair_bytes;
                         auto go = [&](auto kernel) {
                           launch_k(kernel, n_tokens, threads, smem, stream, yp, wp, pair_row, top_k,
                                    static_cast<TO*>(nullptr), cols, rp, nw, hp, norm->eps);
                         };
                         if (vec)
                           go(moe_unpermute_kernel<TY, TO, TW, true, true, 4>);
                         else
                           go(moe_unpermute_kernel<TY, TO, TW, false, true, 1>);
                       });
                     }
                   }));
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const int32_t* pair_row, DevTensor out,
                                 cudaStream_t stream, const RowAddNorm* norm) {
  return unpermute(y, weights, PairRows{pair_row, nullptr, 0, 0}, out, stream, norm);
}

cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const MoeRowSource& rows, int count,
                                 DevTensor out, cudaStream_t stream, const RowAddNorm* norm) {
  if (rows.ids == nullptr && rows.pair_row == nullptr) return cudaErrorInvalidValue;
  return unpermute(y, weights, PairRows{rows.ids ? nullptr : rows.pair_row, rows.ids, rows.first, count}, out, stream,
                   norm);
}

}  // namespace cpinfer::cuda
