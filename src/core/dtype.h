// Element types: bf16/f16 storage with fp32 arithmetic.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace cpinfer {

// F8E4M3: float8 e4m3 "fn" (safetensors "F8_E4M3", torch.float8_e4m3fn), the storage of FP8
// checkpoints' weights; never an activation (linear weights may be FP8: ops/backend.h Weight).
enum class DType : uint8_t { F32, F16, BF16, I32, I64, U8, F8E4M3 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::I32:
      return 4;
    case DType::I64:
      return 8;
    case DType::U8:
      return 1;
    case DType::F8E4M3:
      return 1;
  }
  return 0;
}

std::string_view dtype_name(DType t);

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float8 e4m3fn: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities; S.1111.111 is
// NaN; the largest finite value is 448. Exact in fp32.
inline float fp8_e4m3_to_f32(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24, exp = (v >> 3) & 0xfu, mant = v & 0x7u;
  uint32_t bits;
  if (exp == 0xfu && mant == 0x7u) {
    bits = sign | 0x7fc00000u;
  } else if (exp == 0) {  // zero or subnormal: mant · 2^-9, exact
    float f = static_cast<float>(mant) * 0.001953125f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp - 7u + 127u) << 23) | (mant << 20);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Nearest e4m3fn code, ties to the even code (torch's cast); |f| above 448 saturates to ±448 (FP8
// quantizers scale their blocks into range first); NaN becomes the NaN code.
uint8_t f32_to_fp8_e4m3(float f);

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of `src` (any float dtype) to fp32.
void to_f32(const void* src, DType src_type, float* dst, size_t n);
// Converts n fp32 values to `dst_type` (F32/F16/BF16).
void from_f32(const float* src, void* dst, DType dst_type, size_t n);

}  // namespace cpinfer
