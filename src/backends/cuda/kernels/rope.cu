// Fused per-head RMSNorm + NeoX RoPE, in place on q [T, Hq, D] and k [T, Hkv, D] (RoPE alone when
// the norm weights are null: families without q/k norm, e.g. Llama). Three kernels: decode-sized
// batches one warp per (token, head): the head is staged in shared memory as fp32 so that element i
// can meet its rotation partner i + D/2, the norm is a warp reduction, and the result is rounded
// once; prefill-sized batches one CTA per token, in 16-byte lanes for BF16 with D a power of two
// (qk_norm_rope_vec_kernel), else in element pairs (qk_norm_rope_token_kernel). With a cache
// (slots != nullptr) the k heads are also stored rotated, with the token's v heads, into the paged
// cache (what kv_store does next on one rank: one launch fewer per layer).
#include <type_traits>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxD = 1024;
constexpr int64_t kTokMinTokens = 16;  // fewer (decode): a warp per (token, head), more CTAs

template <class T, class TW>
__global__ void qk_norm_rope_kernel(T* __restrict__ q, T* __restrict__ k, const TW* __restrict__ qw,
                                    const TW* __restrict__ kw, const int32_t* __restrict__ positions,
                                    const float* __restrict__ inv_freq, int64_t n_tokens, int hq, int hkv, int d,
                                    float eps, float attention_factor, const T* __restrict__ v,
                                    const int32_t* __restrict__ slots, T* __restrict__ ck, T* __restrict__ cv,
                                    int64_t n_slots) {
  pdl_wait();
  pdl_trigger();
  extern __shared__ float smem[];  // [kWarps, D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* s = smem + warp * d;
  const int heads = hq + hkv;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // (token, head) pair
  if (item >= n_tokens * heads) return;
  const int64_t t = item / heads;
  const int h = static_cast<int>(item % heads);
  const bool is_q = h < hq;
  T* x = is_q ? q + (t * hq + h) * d : k + (t * hkv + (h - hq)) * d;
  const TW* w = is_q ? qw : kw;

  float ss = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float v = to_f32<T>(x[i]);
    s[i] = v;
    ss += v * v;
  }
  const float inv = w != nullptr ? rsqrtf(warp_sum(ss) / static_cast<float>(d) + eps) : 1.0f;
  __syncwarp();
  const int half = d / 2;
  const float pos = static_cast<float>(positions[t]);
  int64_t slot = -1;  // where this k head also goes in the cache
  if (slots != nullptr && !is_q) {
    slot = slots[t];
    if (slot >= n_slots) slot = -1;  // padding rows carry -1
  }
  const int64_t c_off = (slot * hkv + (h - hq)) * d;
  for (int i = lane; i < half; i += 32) {
    const float x1 = w != nullptr ? s[i] * inv * to_f32<TW>(w[i]) : s[i];
    const float x2 = w != nullptr ? s[i + half] * inv * to_f32<TW>(w[i + half]) : s[i + half];
    const float f = pos * inv_freq[i];
    const float c = cosf(f) * attention_factor, sn = sinf(f) * attention_factor;
    const T y1 = from_f32<T>(x1 * c - x2 * sn), y2 = from_f32<T>(x2 * c + x1 * sn);
    x[i] = y1;
    x[i + half] = y2;
    if (slot >= 0) {
      ck[c_off + i] = y1;
      ck[c_off + i + half] = y2;
    }
  }
  if (slot >= 0) {
    const T* vh = v + (t * hkv + (h - hq)) * d;
    for (int i = lane; i < d; i += 32) cv[c_off + i] = vh[i];
  }
}

// The start of the per-token kernels: token t's cos and sin of position · inv_freq[i] times the
// attention factor into cs[i] and cs[half + i] (i < half, by the CTA's threads; the caller
// synchronizes before reading them), and the cache slot its k and v heads also go to (-1: none).
__device__ __forceinline__ int64_t token_start(float* cs, int half, int64_t t, const int32_t* __restrict__ positions,
                                               const float* __restrict__ inv_freq, float attention_factor,
                                               const int32_t* __restrict__ slots, int64_t n_slots) {
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float f = pos * inv_freq[i];
    cs[i] = cosf(f) * attention_factor;
    cs[half + i] = sinf(f) * attention_factor;
  }
  int64_t slot = -1;
  if (slots != nullptr) {
    slot = slots[t];
    if (slot >= n_slots) slot = -1;  // padding rows carry -1
  }
  return slot;
}

// Many tokens (prefill; F32, or D not a power of two): one CTA per token for all of its Hq + Hkv
// heads. The per-head kernel above evaluates cosf/sinf of position · inv_freq[i] in every head,
// (Hq + Hkv) times per token, and reads 2-byte elements; here the token's D/2 cos and sin are
// computed once into shared memory (token_start), each warp takes heads in turn, and lane l reads
// and writes the element pairs (2p, 2p + 1) and (D/2 + 2p, D/2 + 2p + 1), p = l + 32j, as
// 2-element vectors (D % 4 == 0, D <= kTokMaxD). The arithmetic per element is the per-head
// kernel's; the norm's sum of squares is added in another order.
constexpr int kTokWarps = 8;
constexpr int kTokMaxD = 256;
constexpr int kTokIter = kTokMaxD / 4 / 32;  // pairs of a half per lane
template <class T>
struct alignas(2 * sizeof(T)) Two {
  T a, b;
};
template <class T, class TW>
__global__ void __launch_bounds__(kTokWarps * 32)
    qk_norm_rope_token_kernel(T* __restrict__ q, T* __restrict__ k, const TW* __restrict__ qw,
                              const TW* __restrict__ kw, const int32_t* __restrict__ positions,
                              const float* __restrict__ inv_freq, int hq, int hkv, int d, float eps,
                              float attention_factor, const T* __restrict__ v, const int32_t* __restrict__ slots,
                              T* __restrict__ ck, T* __restrict__ cv, int64_t n_slots) {
  pdl_wait();
  pdl_trigger();
  __shared__ float cs[kTokMaxD];  // [0, D/2): cos · factor, [D/2, D): sin · factor
  const int64_t t = blockIdx.x;
  const int half = d / 2, pairs = d / 4;
  const int64_t slot = token_start(cs, half, t, positions, inv_freq, attention_factor, slots, n_slots);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int h = warp; h < hq + hkv; h += kTokWarps) {
    const bool is_q = h < hq;
    T* x = is_q ? q + (t * hq + h) * d : k + (t * hkv + (h - hq)) * d;
    const TW* w = is_q ? qw : kw;
    Two<T> lo[kTokIter], hi[kTokIter];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kTokIter; ++j) {
      const int p = lane + 32 * j;
      if (p < pairs) {
        lo[j] = *reinterpret_cast<const Two<T>*>(x + 2 * p);
        hi[j] = *reinterpret_cast<const Two<T>*>(x + half + 2 * p);
        const float a = to_f32<T>(lo[j].a), b = to_f32<T>(lo[j].b);
        const float c = to_f32<T>(hi[j].a), e = to_f32<T>(hi[j].b);
        ss += a * a + b * b + c * c + e * e;
      }
    }
    const float inv = w != nullptr ? rsqrtf(warp_sum(ss) / static_cast<float>(d) + eps) : 1.0f;
    const int64_t c_off = (slot * hkv + (h - hq)) * d;
    const bool store = slot >= 0 && !is_q;
    // Element i (first half) and its partner i + D/2, as the per-head kernel computes them.
    auto rotate = [&](float s1, float s2, int i, T& y1, T& y2) {
      const float x1 = w != nullptr ? s1 * inv * to_f32<TW>(w[i]) : s1;
      const float x2 = w != nullptr ? s2 * inv * to_f32<TW>(w[i + half]) : s2;
      const float c = cs[i], sn = cs[half + i];
      y1 = from_f32<T>(x1 * c - x2 * sn);
      y2 = from_f32<T>(x2 * c + x1 * sn);
    };
#pragma unroll
    for (int j = 0; j < kTokIter; ++j) {
      const int p = lane + 32 * j;
      if (p < pairs) {
        Two<T> y1, y2;
        rotate(to_f32<T>(lo[j].a), to_f32<T>(hi[j].a), 2 * p, y1.a, y2.a);
        rotate(to_f32<T>(lo[j].b), to_f32<T>(hi[j].b), 2 * p + 1, y1.b, y2.b);
        *reinterpret_cast<Two<T>*>(x + 2 * p) = y1;
        *reinterpret_cast<Two<T>*>(x + half + 2 * p) = y2;
        if (store) {
          *reinterpret_cast<Two<T>*>(ck + c_off + 2 * p) = y1;
          *reinterpret_cast<Two<T>*>(ck + c_off + half + 2 * p) = y2;
        }
      }
    }
    if (store) {
      const T* vh = v + (t * hkv + (h - hq)) * d;
      for (int p = lane; p < d / 2; p += 32)
        *reinterpret_cast<Two<T>*>(cv + c_off + 2 * p) = *reinterpret_cast<const Two<T>*>(vh + 2 * p);
    }
  }
}

// Many BF16 tokens with D = 8·L, L a power of two from 2 to 32 (Qwen3's and Llama's D = 128: L =
// 16): one CTA per token, each warp L-lane groups of one head each, a lane holding 8 consecutive
// elements as one 16-byte load and store. (The per-token kernel above reads 4 bytes a lane and
// spends ~200 instructions per head; Nsight Compute put it at a third of the DRAM bandwidth with
// its issue slots 63% busy at 4K tokens. H100, 2026-12-06: 52.6 against 34.9 µs a layer for this
// one.) Lane l' of a head holds elements 8l'..8l'+7; its rotation partners are in lane l' ± L/2,
// whose normalized values come by one shuffle each. The token's cos/sin (times the attention
// factor) are computed once into shared memory, and each lane keeps the 8 it needs and its 8 norm
// weights of q and of k in registers. Per element the arithmetic is the per-head kernel's (x1 = s1
// · inv · w[i], y1 = x1 · c − x2 · sn, y2 = x2 · c + x1 · sn); the sum of squares is added in
// another order. Each warp loads its next head group before working on the current one.
template <class TW, int L>
__global__ void __launch_bounds__(256)
    qk_norm_rope_vec_kernel(__nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ k, const TW* __restrict__ qw,
                            const TW* __restrict__ kw, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq, int hq, int hkv, float eps, float attention_factor,
                            const __nv_bfloat16* __restrict__ v, const int32_t* __restrict__ slots,
                            __nv_bfloat16* __restrict__ ck, __nv_bfloat16* __restrict__ cv, int64_t n_slots) {
  constexpr int kD = 8 * L, kHalf = kD / 2, kHeadsPerWarp = 32 / L;
  pdl_wait();
  pdl_trigger();
  __shared__ float cs[kD];  // [0, D/2): cos · factor, [D/2, D): sin · factor
  const int64_t t = blockIdx.x;
  const int64_t slot = token_start(cs, kHalf, t, positions, inv_freq, attention_factor, slots, n_slots);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int hl = lane % L, e0 = 8 * hl;    // this lane's elements of its head
  const bool first = e0 < kHalf;           // the partners are e0 + D/2 (first half) or e0 - D/2
  const int i0 = first ? e0 : e0 - kHalf;  // their frequencies i0..i0+7
  const bool norm = qw != nullptr;
  float wq[8], wk[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    wq[j] = norm ? to_f32<TW>(qw[e0 + j]) : 1.0f;
    wk[j] = norm ? to_f32<TW>(kw[e0 + j]) : 1.0f;
  }
  __syncthreads();
  float c[8], sn[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = cs[i0 + j];
    sn[j] = cs[kHalf + i0 + j];
  }
  const int heads = hq + hkv;
  const int groups = (heads + kHeadsPerWarp - 1) / kHeadsPerWarp;
  auto head_ptr = [&](int h) -> __nv_bfloat16* {
    return h < hq ? q + (t * hq + h) * kD : k + (t * hkv + (h - hq)) * kD;
  };
  auto load = [&](int g) {
    const int h = g * kHeadsPerWarp + lane / L;
    return g < groups && h < heads ? *reinterpret_cast<const uint4*>(head_ptr(h) + e0) : make_uint4(0, 0, 0, 0);
  };
  uint4 next = load(warp);
  for (int g = warp; g < groups; g += n_warps) {
    const uint4 raw = next;
    next = load(g + n_warps);
    const int h = g * kHeadsPerWarp + lane / L;
    const bool valid = h < heads, is_q = h < hq;
    const uint32_t w4[4] = {raw.x, raw.y, raw.z, raw.w};
    float x[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[2 * j] = __uint_as_float(w4[j] << 16);
      x[2 * j + 1] = __uint_as_float(w4[j] & 0xffff0000u);
    }
    if (norm) {
      float ss = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += x[j] * x[j];
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      const float inv = rsqrtf(ss / static_cast<float>(kD) + eps);
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = x[j] * inv * (is_q ? wq[j] : wk[j]);
    }
    float y[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float p = __shfl_xor_sync(0xffffffffu, x[j], L / 2);  // the partner's normalized value
      y[j] = first ? x[j] * c[j] - p * sn[j] : x[j] * c[j] + p * sn[j];
    }
    if (!valid) continue;
    uint32_t o4[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_bfloat162 two = __floats2bfloat162_rn(y[2 * j], y[2 * j + 1]);
      o4[j] = *reinterpret_cast<const uint32_t*>(&two);
    }
    const uint4 out = make_uint4(o4[0], o4[1], o4[2], o4[3]);
    *reinterpret_cast<uint4*>(head_ptr(h) + e0) = out;
    if (slot >= 0 && !is_q) {
      const int64_t c_off = (slot * hkv + (h - hq)) * kD + e0;
      *reinterpret_cast<uint4*>(ck + c_off) = out;
      *reinterpret_cast<uint4*>(cv + c_off) = *reinterpret_cast<const uint4*>(v + (t * hkv + (h - hq)) * kD + e0);
    }
  }
}

}  // namespace

cudaError_t launch_qk_norm_rope(DevTensor q, DevTensor k, const DevTensor& q_norm_w, const DevTensor& k_norm_w,
                                float eps, const DevTensor& positions, const float* inv_freq, float attention_factor,
                                cudaStream_t stream, const DevTensor* v, const DevTensor* slots, const DevKv* cache) {
  const int64_t n_tokens = q.dim(0);
  const int hq = static_cast<int>(q.dim(1)), hkv = static_cast<int>(k.dim(1)), d = static_cast<int>(q.dim(2));
  const int64_t items = n_tokens * (hq + hkv);
  if (items == 0 || d == 0) return cudaSuccess;
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  if (d > kMaxD || q.dtype != k.dtype || q_norm_w.dtype != k_norm_w.dtype || blocks > INT32_MAX)
    return cudaErrorInvalidValue;
  const bool store = cache != nullptr;
  if (store && (v == nullptr || slots == nullptr || cache->k.dtype != q.dtype || cache->v.dtype != q.dtype ||
                v->dtype != q.dtype || cache->k.dim(2) != hkv || cache->k.dim(3) != d))
    return cudaErrorInvalidValue;
  const int64_t n_slots = store ? cache->k.dim(0) * cache->k.dim(1) : 0;
  // Prefill-sized batches take the per-token kernel where its layout applies (every tensor's rows
  // 2-element aligned: D % 4 == 0 and aligned bases).
  auto aligned = [](const void* p, size_t bytes) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
  };
  const size_t two = 2 * dtype_size(q.dtype);
  const bool per_token =
      n_tokens >= kTokMinTokens && d % 4 == 0 && d <= kTokMaxD && n_tokens <= INT32_MAX && aligned(q.data, two) &&
      aligned(k.data, two) &&
      (!store || (aligned(v->data, two) && aligned(cache->k.data, two) && aligned(cache->v.data, two)));
  // BF16 with D = 8·L (L a power of two, 2..32) and 16-byte aligned rows: the vector kernel, with
  // as many warps (up to 8) as spread the token's head groups evenly.
  const bool vec = per_token && q.dtype == DType::BF16 && d >= 16 && (d & (d - 1)) == 0 && aligned(q.data, 16) &&
                   aligned(k.data, 16) &&
                   (!store || (aligned(v->data, 16) && aligned(cache->k.data, 16) && aligned(cache->v.data, 16)));
  const int vec_lanes = vec ? d / 8 : 0;
  int vec_warps = 0;
  if (vec) {
    const int groups = (hq + hkv + 32 / vec_lanes - 1) / (32 / vec_lanes);
    const int rounds = (groups + 7) / 8;
    vec_warps = (groups + rounds - 1) / rounds;
  }
  const size_t smem = static_cast<size_t>(kWarps) * d * sizeof(float);
  CPI_DISPATCH_ACT(
      q.dtype, "qk_norm_rope q", T, CPI_DISPATCH_FLOAT(q_norm_w.dtype, "qk_norm_rope weight", TW, {
        T* const qp = static_cast<T*>(q.data);
        T* const kp = static_cast<T*>(k.data);
        const TW* const qw = static_cast<const TW*>(q_norm_w.data);
        const TW* const kw = static_cast<const TW*>(k_norm_w.data);
        const int32_t* const pos = positions.ptr<const int32_t>();
        const T* const vp = store ? static_cast<const T*>(v->data) : nullptr;
        const int32_t* const sp = store ? slots->ptr<const int32_t>() : nullptr;
        T* const ck = store ? static_cast<T*>(cache->k.data) : nullptr;
        T* const cv = store ? static_cast<T*>(cache->v.data) : nullptr;
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          if (vec_lanes > 0) {
            const auto kernel = vec_lanes == 2    ? qk_norm_rope_vec_kernel<TW, 2>
                                : vec_lanes == 4  ? qk_norm_rope_vec_kernel<TW, 4>
                                : vec_lanes == 8  ? qk_norm_rope_vec_kernel<TW, 8>
                                : vec_lanes == 16 ? qk_norm_rope_vec_kernel<TW, 16>
                                                  : qk_norm_rope_vec_kernel<TW, 32>;
            launch_k(kernel, static_cast<unsigned>(n_tokens), vec_warps * 32, 0, stream, qp, kp, qw, kw, pos, inv_freq,
                     hq, hkv, eps, attention_factor, vp, sp, ck, cv, n_slots);
            return cudaGetLastError();
          }
        }
        if (per_token)
          launch_k(qk_norm_rope_token_kernel<T, TW>, static_cast<unsigned>(n_tokens), kTokWarps * 32, 0, stream, qp, kp,
                   qw, kw, pos, inv_freq, hq, hkv, d, eps, attention_factor, vp, sp, ck, cv, n_slots);
        else
          launch_k(qk_norm_rope_kernel<T, TW>, static_cast<unsigned>(blocks), kWarps * 32, smem, stream, qp, kp, qw, kw,
                   pos, inv_freq, n_tokens, hq, hkv, d, eps, attention_factor, vp, sp, ck, cv, n_slots);
      }));
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
