// Fused per-head RMSNorm + NeoX RoPE, in place on q [T, Hq, D] and k [T, Hkv, D] (RoPE alone when
// the norm weights are null: families without q/k norm, e.g. Llama). One warp per
// (token, head): the head is staged in shared memory as fp32 so that element i can meet its
// rotation partner i + D/2, the norm is a warp reduction, and the result is rounded once. With a
// cache (slots != nullptr) the warps of k heads also store their rotated k and the token's v head
// into the paged cache (what kv_store does next on one rank: one launch fewer per decode layer).
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

// Many tokens (prefill): one CTA per token for all of its Hq + Hkv heads. The per-head kernel above
// evaluates cosf/sinf of position · inv_freq[i] in every head, (Hq + Hkv) times per token, and reads
// 2-byte elements; here the token's D/2 cos and sin are computed once into shared memory, each warp
// takes heads in turn, and lane l reads and writes the element pairs (2p, 2p + 1) and (D/2 + 2p,
// D/2 + 2p + 1), p = l + 32j, as 2-element vectors (D % 4 == 0, D <= kTokMaxD). The arithmetic per
// element is the per-head kernel's; the norm's sum of squares is added in another order.
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
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float f = pos * inv_freq[i];
    cs[i] = cosf(f) * attention_factor;
    cs[half + i] = sinf(f) * attention_factor;
  }
  int64_t slot = -1;  // where the k heads also go in the cache
  if (slots != nullptr) {
    slot = slots[t];
    if (slot >= n_slots) slot = -1;  // padding rows carry -1
  }
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
