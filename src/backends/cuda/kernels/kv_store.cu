// Writes the new tokens' k and v rows into the paged KV cache. The cache [n_blocks, block_size,
// Hkv, D] is, row for row, [n_slots, Hkv·D] with slot = block · block_size + offset, so one block
// per token copies (and converts) one row of each. Slots < 0 (padding) and slots past the cache
// are skipped: the host checks nothing here, a bad slot must not fault.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

template <class TI, class TC, bool kVec>
__global__ void kv_store_kernel(const TI* __restrict__ k, const TI* __restrict__ v, const int32_t* __restrict__ slots,
                                TC* __restrict__ ck, TC* __restrict__ cv, int64_t n_slots, int64_t row) {
  pdl_wait();
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= n_slots) return;
  const TI* ks = k + t * row;
  const TI* vs = v + t * row;
  TC* kd = ck + slot * row;
  TC* vd = cv + slot * row;
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < row; c += blockDim.x * 8) {
      float a[8], b[8];
      load8(ks + c, a);
      load8(vs + c, b);
      store8(kd + c, a);
      store8(vd + c, b);
    }
  } else {
    for (int64_t c = threadIdx.x; c < row; c += blockDim.x) {
      kd[c] = from_f32<TC>(to_f32<TI>(ks[c]));
      vd[c] = from_f32<TC>(to_f32<TI>(vs[c]));
    }
  }
}

}  // namespace

cudaError_t launch_kv_store(const DevTensor& k, const DevTensor& v, const DevTensor& slots, const DevKv& cache,
                            cudaStream_t stream) {
  const int64_t n_tokens = k.dim(0);
  const int64_t row = k.dim(1) * k.dim(2);
  if (n_tokens == 0 || row == 0) return cudaSuccess;
  const int64_t n_slots = cache.k.dim(0) * cache.k.dim(1);
  const bool vec =
      row % 8 == 0 && aligned16(k.data) && aligned16(v.data) && aligned16(cache.k.data) && aligned16(cache.v.data);
  const int64_t units = vec ? row / 8 : row;
  const int threads = units >= 256 ? 256 : static_cast<int>(((units + 31) / 32) * 32);
  CPI_DISPATCH_ACT(
      k.dtype, "kv_store k", TI, CPI_DISPATCH_ACT(cache.k.dtype, "kv_store cache", TC, {
        auto* kp = static_cast<const TI*>(k.data);
        auto* vp = static_cast<const TI*>(v.data);
        auto* ck = static_cast<TC*>(cache.k.data);
        auto* cv = static_cast<TC*>(cache.v.data);
        const auto* sp = slots.ptr<const int32_t>();
        if (vec)
          launch_k(kv_store_kernel<TI, TC, true>, n_tokens, threads, 0, stream, kp, vp, sp, ck, cv, n_slots, row);
        else
          launch_k(kv_store_kernel<TI, TC, false>, n_tokens, threads, 0, stream, kp, vp, sp, ck, cv, n_slots, row);
      }));
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
