// e4m3 (FP8 e4m3fn) by its definition, for the FP8 tests of this folder (fp8_format_test.cpp,
// fp8_test.cpp): a code's value and the nearest code to a value, independent of core/dtype.h's bit
// assembly and rounding.
#pragma once
#include <cmath>
#include <cstdint>

namespace cpinfer::test {

// e4m3fn by its definition, independent of fp8_e4m3_to_f32's bit assembly.
inline double e4m3_by_definition(int code) {
  const int sign = code >> 7, exp = (code >> 3) & 15, mant = code & 7;
  if (exp == 15 && mant == 7) return std::nan("");
  const double mag = exp == 0 ? std::ldexp(mant / 8.0, -6) : std::ldexp(1.0 + mant / 8.0, exp - 7);
  return sign ? -mag : mag;
}

// Nearest e4m3 code to x (|x| <= 448), ties to the even code, the sign kept (-0 too), as torch's
// cast rounds.
inline uint8_t e4m3_encode(float x) {
  const double a = std::fabs(static_cast<double>(x));
  int best = 0;
  for (int c = 1; c < 127; ++c) {
    const double d = std::fabs(e4m3_by_definition(c) - a), db = std::fabs(e4m3_by_definition(best) - a);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(x) ? 0x80 : 0));
}

}  // namespace cpinfer::test
