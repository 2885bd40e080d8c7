// AVX2 + FMA + F16C layer (8 fp32 lanes). Include only after `#pragma GCC target("avx2,...")`.
#pragma once

#include <immintrin.h>

#include "scalar.h"

namespace eas::cpu {

struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static constexpr const char* kName = "avx2";
  // Tile shapes (accumulators + operands fit the 16 vector registers).
  static constexpr int kDotRows = 3, kDotCols = 3;
  static constexpr int kAxpyRows = 4, kAxpyVecs = 3;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V abs(V a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half_bits(v)); }
  static void store(BFloat16* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bfloat16_bits(v));
  }

  // As store(), with a non-temporal store where p is aligned to the store's width (a result
  // this kernel does not read again: no read-for-ownership of its cache lines); returns the
  // values stored, rounded to the storage type, as fp32 (for the finiteness check).
  static V stream(float* p, V v) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_storeu_ps(p, v);
    }
    return v;
  }
  static V stream(Half* p, V v) {
    const __m128i h = half_bits(v);
    stream_bits(p, h);
    return _mm256_cvtph_ps(h);
  }
  static V stream(BFloat16* p, V v) {
    const __m128i h = bfloat16_bits(v);
    stream_bits(p, h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void fence() { _mm_sfence(); }

 private:
  static __m128i half_bits(V v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // Round to nearest even; NaN becomes 0x7FC0 (scalar.h's from_float<BFloat16>).
  static __m128i bfloat16_bits(V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // pack 8 x u32 (each <= 0xFFFF) to 8 x u16: packus works per 128-bit lane
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  static void stream_bits(void* p, __m128i h) {
    if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      _mm_stream_si128(static_cast<__m128i*>(p), h);
    } else {
      _mm_storeu_si128(static_cast<__m128i*>(p), h);
    }
  }
};

}  // namespace eas::cpu
