// Shared by the CUDA kernel benchmarks (attention_bench, moe_bench): a fatal check for CUDA calls
// and a device-side filler of uniform random bf16 values.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

// Exits with "<kBenchName>: <call> failed: <reason>"; each benchmark defines kBenchName.
#define BENCH_CHECK(call)                                                                     \
  do {                                                                                        \
    cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s: %s failed: %s\n", kBenchName, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// p[i] = uniform(-scale, scale) from a hash of (i, seed): the same values on every run.
__global__ inline void fill_random_bf16(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 0x9E3779B9u;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    p[i] = __float2bfloat16((static_cast<float>(h) * (1.0f / 4294967296.0f) * 2.0f - 1.0f) * scale);
  }
}
