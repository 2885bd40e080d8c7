// Portable layer: 4 fp32 lanes in plain C++ that compilers vectorise for the baseline ISA
// (SSE2 on x86-64, NEON on aarch64). Conversions go through scalar.h.
#pragma once

#include "scalar.h"

namespace eas::cpu {

struct Portable {
  struct V {
    float x[4];
  };
  static constexpr int kWidth = 4;
  static constexpr const char* kName = "portable";
  static constexpr int kDotRows = 3, kDotCols = 3;
  static constexpr int kAxpyRows = 4, kAxpyVecs = 3;

  static V zero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
  static V set1(float a) { return V{{a, a, a, a}}; }
  static V fma(V a, V b, V c) {
    V r;
    for (int i = 0; i < 4; ++i) r.x[i] = __builtin_fmaf(a.x[i], b.x[i], c.x[i]);
    return r;
  }
  static V add(V a, V b) {
    V r;
    for (int i = 0; i < 4; ++i) r.x[i] = a.x[i] + b.x[i];
    return r;
  }
  static V abs(V a) {
    V r;
    for (int i = 0; i < 4; ++i) r.x[i] = __builtin_fabsf(a.x[i]);
    return r;
  }
  // NaN-free use only (the merge bound runs on finite rows).
  static V max(V a, V b) {
    V r;
    for (int i = 0; i < 4; ++i) r.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
    return r;
  }
  static float sum(V a) { return (a.x[0] + a.x[2]) + (a.x[1] + a.x[3]); }
  static float hmax(V a) {
    const float lo = a.x[0] > a.x[1] ? a.x[0] : a.x[1];
    const float hi = a.x[2] > a.x[3] ? a.x[2] : a.x[3];
    return lo > hi ? lo : hi;
  }

  template <class T>
  static V load(const T* p) {
    V r;
    for (int i = 0; i < 4; ++i) r.x[i] = to_float(p[i]);
    return r;
  }
  template <class T>
  static void store(T* p, V v) {
    for (int i = 0; i < 4; ++i) p[i] = from_float<T>(v.x[i]);
  }

  // As store(); returns the values stored, rounded to T, as fp32 (the finiteness check).
  template <class T>
  static V stream(T* p, V v) {
    store(p, v);
    return load(p);
  }
  static void fence() {}
};

}  // namespace eas::cpu
