// Storage types and exact scalar conversions (IEEE round to nearest even), portable C++.
//
// Used by the portable SIMD layer and for single elements (tails, activations) by all
// layers. Included before any `#pragma GCC target`, so its inline functions compile for
// the baseline ISA.
#pragma once

#include <cstdint>
#include <cstring>

namespace eas::cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Shift `m` right by `s` (1..31) rounding to nearest, ties to even.
inline uint32_t shift_round_even(uint32_t m, int s) {
  const uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u);
  const uint32_t half = 1u << (s - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

template <class T>
T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even; every NaN becomes 0x7FC0 (as c10::BFloat16 does).
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{0x7FC0};
  return BFloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// Round to nearest even, overflow to infinity, subnormals exact; NaN becomes 0x7E00.
template <>
inline Half from_float<Half>(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u)};
  if (magnitude >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent < -14) {  // fp16 subnormal (or zero): count units of 2^-24
    const int shift = -(exponent + 1);  // value / 2^-24 = m * 2^(exponent + 1), m has 24 bits
    if (shift > 25) return Half{sign};  // below 2^-25 (fp32 subnormals included)
    const uint32_t m = (magnitude & 0x7FFFFFu) | 0x800000u;
    return Half{static_cast<uint16_t>(sign | shift_round_even(m, shift))};
  }
  const uint32_t q = (static_cast<uint32_t>(exponent + 15) << 10) | ((magnitude >> 13) & 0x3FFu);
  const uint32_t rem = magnitude & 0x1FFFu;
  const uint32_t rounded = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
  return Half{static_cast<uint16_t>(sign | rounded)};
}

// Largest finite value of a storage type.
template <class T>
constexpr double max_finite();
template <>
constexpr double max_finite<float>() {
  return 3.4028234663852886e38;
}
template <>
constexpr double max_finite<BFloat16>() {
  return 3.3895313892515355e38;
}
template <>
constexpr double max_finite<Half>() {
  return 65504.0;
}

inline bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

}  // namespace eas::cpu
