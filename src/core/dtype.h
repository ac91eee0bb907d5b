// Element types: bf16/f16 storage with fp32 arithmetic.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace cpinfer {

enum class DType : uint8_t { F32, F16, BF16, I32, I64, U8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
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
