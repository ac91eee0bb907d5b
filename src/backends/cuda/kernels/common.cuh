// Device helpers shared by the kernels: element conversion, 16-byte vector loads/stores, warp
// reductions, the launch helpers (programmatic launch, dynamic shared memory) and the host-side
// dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {

template <class T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// Eight consecutive elements as fp32, loaded/stored with 16-byte accesses (two for fp32). The
// pointer must be 16-byte aligned: callers take this path only when every row start is.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32<T>(e[i]);
  } else {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
    v[4] = b.x;
    v[5] = b.y;
    v[6] = b.z;
    v[7] = b.w;
  }
}

template <class T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The block size of the kernels that give a row of `units` (8-element chunks, or elements) a
// thread each: whole warps, at most 1024 (rms_norm_kernel's; the fused norms play it, norm.cuh).
__host__ __device__ constexpr int row_threads(int64_t units) {
  const int64_t t = ((units + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < n_warps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

// ---- Programmatic dependent launch (compute capability 9.0): a kernel launched by launch_k may
// start while the kernel before it on the stream is still running (its launch latency and, for the
// decode GEMMs, its weight reads overlap that kernel's tail). pdl_wait() returns once the previous
// kernel has completed and its writes are visible: a kernel must call it before it reads anything an
// earlier kernel wrote or writes anything an earlier kernel reads (only constant inputs, the weights,
// may be read before). pdl_trigger() lets the next kernel launch. Both are no-ops when the kernel was
// launched without the attribute (or on older GPUs).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Lets `kernel` launch with `bytes` of dynamic shared memory. Above 48 KB of dynamic and static
// shared memory together a kernel must opt in, per device (cudaFuncSetAttribute). The largest size
// opted in per (kernel, device) is remembered, so only a launch that needs more than every earlier
// one calls the runtime: in practice the first, a warm-up outside any stream capture. Launches of
// up to 16 KB skip the bookkeeping (no kernel here has 32 KB of static shared memory).
inline cudaError_t opt_in_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 16 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> opted;
  const std::lock_guard<std::mutex> lock(mu);
  size_t& have = opted[{kernel, device}];
  if (have >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) have = bytes;
  return err;
}
template <class... P>
cudaError_t opt_in_dynamic_smem(void (*kernel)(P...), size_t bytes) {
  return opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

// The current device's SM count (grids sized to one wave or one CTA per SM).
inline cudaError_t current_device_sms(int& sms) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err == cudaSuccess ? cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) : err;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when
// `programmatic`, with the dynamic shared-memory opt-in done when smem needs it.
template <class... P, class... A>
cudaError_t launch_k_as(bool programmatic, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, A&&... args) {
  const cudaError_t opt = opt_in_dynamic_smem(kernel, smem);
  if (opt != cudaSuccess) return opt;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}
// launch_k_as with programmatic dependent launch allowed when programmatic_launch() is on. Every
// kernel launched here calls pdl_wait() before its first access to data of earlier kernels.
template <class... P, class... A>
cudaError_t launch_k(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  return launch_k_as(programmatic_launch(), kernel, grid, block, smem, stream, std::forward<A>(args)...);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned grid_1d(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

// Grouped MoE GEMMs: the expert whose M-tiles contain tile slot m_slot, i.e. the largest e with
// tile_start[e] <= m_slot (tile_start [count + 1] is the prefix sum of the experts' tile counts).
__device__ __forceinline__ int expert_of_tile(const int32_t* __restrict__ tile_start, int count, int m_slot) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(tile_start + mid) <= m_slot)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// silu(g) · u of the MoE epilogues: g / (1 + e^-g) with the fast divide (a reciprocal and a
// multiply). The IEEE division is a subroutine with a slow path, 32 of them per thread and tile in
// the FP8 gate‖up epilogue, which drew 19% of that kernel's warp samples (Nsight Compute, 32K
// tokens, H100). For g below ~-88, e^-g is inf and the quotient -0, silu's limit.
__device__ __forceinline__ float silu_mul(float g, float u) { return __fdividef(g, 1.0f + __expf(-g)) * u; }

// The M-tile of grid slot m_slot in the grouped MoE GEMMs (tile_m rows per tile; tile_start and
// offsets [count + 1] from launch_moe_permute_tiled): false for a slot past the last tile (the CTA
// has nothing to do), else its expert, the expert segment's first row and row count, the tile's
// first row in the segment and the rows left from there (> 0 by construction).
struct MoeTile {
  int expert, seg_begin, seg_rows, m0, rows_left;
};
// The tile of slot m_slot once its expert is known (moe_tile_of; moe_gemm_tiles.cuh's warp-wide
// search).
__device__ __forceinline__ MoeTile moe_tile_in(const int32_t* __restrict__ tile_start,
                                               const int32_t* __restrict__ offsets, int expert, int m_slot,
                                               int tile_m) {
  MoeTile t;
  t.expert = expert;
  t.seg_begin = __ldg(offsets + expert);
  t.seg_rows = __ldg(offsets + expert + 1) - t.seg_begin;
  t.m0 = (m_slot - __ldg(tile_start + expert)) * tile_m;
  t.rows_left = t.seg_rows - t.m0;
  return t;
}
__device__ __forceinline__ bool moe_tile_of(const int32_t* __restrict__ tile_start, const int32_t* __restrict__ offsets,
                                            int count, int m_slot, int tile_m, MoeTile& t) {
  if (m_slot >= __ldg(tile_start + count)) return false;
  t = moe_tile_in(tile_start, offsets, expert_of_tile(tile_start, count, m_slot), m_slot, tile_m);
  return true;
}

}  // namespace cpinfer::cuda

// Host-side dispatch over the float dtypes: CPI_DISPATCH_FLOAT(t, "op x", T, body) runs body with
// T = float / __nv_bfloat16 / __half; other dtypes make the launcher return cudaErrorInvalidValue
// (the back-end checks dtypes first, so this is an internal error).
#define CPI_DISPATCH_FLOAT(dtype, what, T, ...) \
  switch (dtype) {                              \
    case ::cpinfer::DType::F32: {               \
      using T = float;                          \
      __VA_ARGS__;                              \
    } break;                                    \
    case ::cpinfer::DType::BF16: {              \
      using T = __nv_bfloat16;                  \
      __VA_ARGS__;                              \
    } break;                                    \
    case ::cpinfer::DType::F16: {               \
      using T = __half;                         \
      __VA_ARGS__;                              \
    } break;                                    \
    default:                                    \
      return cudaErrorInvalidValue;             \
  }

// Activations: F32 or BF16 only (keeps the number of kernel instantiations small).
#define CPI_DISPATCH_ACT(dtype, what, T, ...) \
  switch (dtype) {                            \
    case ::cpinfer::DType::F32: {             \
      using T = float;                        \
      __VA_ARGS__;                            \
    } break;                                  \
    case ::cpinfer::DType::BF16: {            \
      using T = __nv_bfloat16;                \
      __VA_ARGS__;                            \
    } break;                                  \
    default:                                  \
      return cudaErrorInvalidValue;           \
  }
