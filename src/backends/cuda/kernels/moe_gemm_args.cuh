// What the two implementations of the grouped MoE GEMMs (moe_gemm.cu: mma.sync; moe_gemm_wgmma.cu:
// Hopper wgmma) share on the host side: the kernel arguments, how one call's two GEMMs fill them
// and the checks before a launch. Header-only, so the sm_90a library does not depend on the library
// that links it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {

// Kernel 1 (gate‖up): act [rows, I] BF16 = silu(x[src_token] · gateᵀ) ⊙ (x[src_token] · upᵀ);
// kernel 2 (down): y [rows, H] F32 = act · downᵀ; per expert segment, CTAs find their expert from
// tile_start on the device.
struct MoeGemmArgs {
  const __nv_bfloat16* a;          // kernel 1: x [T, K] (rows through src_token); kernel 2: act [rows, K]
  const int32_t* src_token;        // [rows] token of each permuted row (kernel 1)
  const int32_t* offsets;          // [count + 1]
  const int32_t* tile_start;       // [count + 1]
  const __nv_bfloat16* const* w1;  // [count] gate [I, H] or down [H, I]
  const __nv_bfloat16* const* w2;  // [count] up [I, H] (kernel 1)
  int count;
  int n_out;              // I (kernel 1) or H (kernel 2)
  int k_dim;              // H (kernel 1) or I (kernel 2)
  void* out;              // act [rows, I] BF16 or y [rows, H] F32 (BF16 where out_bf16)
  int n_per_cta = 1;      // N-tiles per CTA (wgmma kernels; the mma.sync ones do one)
  bool out_bf16 = false;  // kernel 2 writes y in BF16 (the wgmma kernels; MoeWgmmaConfig::y_bf16)
};

inline MoeGemmArgs moe_gateup_args(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                   const int32_t* tile_start, int count, const void* const* gate, const void* const* up,
                                   int64_t inter, void* act) {
  MoeGemmArgs a;
  a.a = x.ptr<const __nv_bfloat16>();
  a.src_token = src_token;
  a.offsets = offsets;
  a.tile_start = tile_start;
  a.w1 = reinterpret_cast<const __nv_bfloat16* const*>(gate);
  a.w2 = reinterpret_cast<const __nv_bfloat16* const*>(up);
  a.count = count;
  a.n_out = static_cast<int>(inter);
  a.k_dim = static_cast<int>(x.cols());
  a.out = act;
  return a;
}

// Kernel 2 of the same call: reads kernel 1's act, writes y (in BF16 where y_bf16).
inline MoeGemmArgs moe_down_args(const MoeGemmArgs& gateup, const void* const* down, void* y, bool y_bf16 = false) {
  MoeGemmArgs a = gateup;
  a.a = static_cast<const __nv_bfloat16*>(a.out);
  a.src_token = nullptr;
  a.w1 = reinterpret_cast<const __nv_bfloat16* const*>(down);
  a.w2 = nullptr;
  a.n_out = gateup.k_dim;
  a.k_dim = gateup.n_out;
  a.out = y;
  a.out_bf16 = y_bf16;
  return a;
}

// Before a launch: cudaSuccess with m_slots = the grid's M dimension, or cudaErrorInvalidValue;
// `nothing` when there is no pair to compute.
inline cudaError_t moe_grouped_check(const DevTensor& x, int64_t inter, int64_t n_pairs, int count, int64_t& m_slots,
                                     bool& nothing) {
  nothing = count == 0 || n_pairs == 0;
  if (nothing) return cudaSuccess;
  if (!moe_grouped_gemm_supported(x.cols(), inter) || x.dtype != DType::BF16) return cudaErrorInvalidValue;
  m_slots = moe_grouped_gemm_max_tiles(n_pairs, count);
  return m_slots > 65535 ? cudaErrorInvalidValue : cudaSuccess;  // grid.y; > 8M rows per call
}

// The 1-D grid of a warp-specialized grouped GEMM over `items` (M-tile slot, N-group) items
// (moe_gemm_tiles.cuh ws_for_each_item): one CTA per SM (persistent; they walk the items), or one
// per item.
inline cudaError_t ws_grid(int64_t items, bool persistent, unsigned& grid) {
  int64_t n = items;
  if (persistent) {
    int sms = 0;
    const cudaError_t err = current_device_sms(sms);
    if (err != cudaSuccess) return err;
    n = items < sms ? items : sms;
  }
  if (n <= 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  grid = static_cast<unsigned>(n);
  return cudaSuccess;
}

}  // namespace cpinfer::cuda
