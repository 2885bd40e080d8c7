// AVX-512 layer (16 fp32 lanes). Include only after `#pragma GCC target("avx512f,...")`.
#pragma once

#include <immintrin.h>

#include "scalar.h"

namespace eas::cpu {

struct Avx512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static constexpr const char* kName = "avx512";
  // Tile shapes (accumulators + operands fit the 32 vector registers).
  static constexpr int kDotRows = 4, kDotCols = 6;    // W rows x U rows per dot tile
  static constexpr int kAxpyRows = 6, kAxpyVecs = 4;  // W rows x vectors per axpy tile

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(Half* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half_bits(v)); }
  static void store(BFloat16* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bfloat16_bits(v));
  }

  // As store(), with a non-temporal store where p is aligned to the store's width (a result
  // this kernel does not read again: no read-for-ownership of its cache lines); returns the
  // values stored, rounded to the storage type, as fp32 (for the finiteness check).
  static V stream(float* p, V v) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_storeu_ps(p, v);
    }
    return v;
  }
  static V stream(Half* p, V v) {
    const __m256i h = half_bits(v);
    stream_bits(p, h);
    return _mm512_cvtph_ps(h);
  }
  static V stream(BFloat16* p, V v) {
    const __m256i h = bfloat16_bits(v);
    stream_bits(p, h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void fence() { _mm_sfence(); }

 private:
  static __m256i half_bits(V v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // Round to nearest even; NaN becomes 0x7FC0 (scalar.h's from_float<BFloat16>).
  static __m256i bfloat16_bits(V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static void stream_bits(void* p, __m256i h) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_si256(static_cast<__m256i*>(p), h);
    } else {
      _mm256_storeu_si256(static_cast<__m256i*>(p), h);
    }
  }
};

}  // namespace eas::cpu
