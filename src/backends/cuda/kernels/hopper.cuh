// Hopper (sm_90a) building blocks shared by the wgmma kernels (attention_wgmma.cu,
// moe_gemm_wgmma.cu): the wgmma shared-memory descriptor (128-byte swizzle) and the wgmma group
// fences; the copies they use are in mma.cuh. Defined only in the sm_90a device pass (empty
// elsewhere).
#pragma once
#include <cstdint>

#include "backends/cuda/kernels/mma.cuh"  // smem_u32, cp.async

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace cpinfer::cuda::hopper {

// wgmma shared-memory descriptor: 128-byte swizzle, leading/stride byte offsets in bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // 128B swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

}  // namespace cpinfer::cuda::hopper
#endif
