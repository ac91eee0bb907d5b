// Device helpers for fine-grained FP8 (ops/backend.h Weight: e4m3 codes + F32 block scales): the
// e4m3 -> fp32 widening (exact: every e4m3 value is a half), the fp32 -> e4m3 rounding of the
// activation quantizer (nearest even, saturating at ±448, NaN stays NaN).
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cpinfer::cuda {

inline constexpr int kFp8Blk = 128;           // the checkpoint's block (ops/backend.h kFp8Block)
inline constexpr float kFp8E4m3Max = 448.0f;  // the largest finite e4m3 value

// Two codes (the low byte first) as fp32. e4m3 -> half is exact (the hardware cvt on sm_89 and
// later, an exact emulation elsewhere); half -> fp32 is exact.
__device__ __forceinline__ float2 fp8x2_to_f32(uint16_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  return __half22float2(__half2(h));
}

// Two codes (the low byte first, in the low 16 bits of `two`) as an FP16 pair, the first in the low
// half: the same exact widening, for the tensor cores' FP16 operands.
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// The nearest e4m3 code of x, ties to even, |x| > 448 saturating to ±448 (core/dtype.h's
// f32_to_fp8_e4m3 rounds the same way).
__device__ __forceinline__ uint8_t f32_to_e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// The activation quantizer's block scale: amax / 448, or 1 for an all-zero block (its codes are
// then 0 whatever the scale). Division, not a reciprocal multiply: the test reference computes
// exactly this.
__device__ __forceinline__ float fp8_block_scale(float amax) { return amax > 0.0f ? amax / kFp8E4m3Max : 1.0f; }

// x / scale correctly rounded, as the quantizer's division, from inv = 1 / scale (correctly
// rounded): the product corrected once by its exact residual (Markstein), three instructions
// against the division's reciprocal, corrections and range check. The product alone rounds a tie
// of e4m3 the other way in ~3 of 10^4 codes (BF16 values over a scale of amax / 448 often land on
// one).
__device__ __forceinline__ float fp8_quotient(float x, float scale, float inv) {
  const float q0 = x * inv;
  return fmaf(fmaf(-q0, scale, x), inv, q0);
}

}  // namespace cpinfer::cuda
