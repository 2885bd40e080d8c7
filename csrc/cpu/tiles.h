// Register-tiled building blocks shared by the CPU ops, templated on a SIMD layer `S`
// (simd_*.h) and a storage type `T` (float, Half, BFloat16; axpy's D matrix may be stored
// as float or as T). All arithmetic is fp32.
//
//   dot_tile:  dst[i, j] = Σ_k W[i, k] U[j, k]             (MR rows of W x NR rows of U)
//   axpy_tile: W[i, c]   = round(W[i, c] + Σ_k P[i, k] D[k, c])   (MR rows x NV vectors),
//              stored in place or streamed and checked finite (AxpyStore)
//
// axpy_tile sums Δ = Σ_k P[i, k] D[k, c] from zero (k = 0, 1, ..., r-1, one fused
// multiply-add per term), then adds W once: a single rounding at the magnitude of W, and
// bitwise the same result for every element whatever the tile shape.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace eas::cpu {

// Load n (< width) elements, zero-filling the rest of the vector.
template <class S, class T>
inline typename S::V load_n(const T* p, int64_t n) {
  T tmp[S::kWidth] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return S::load(tmp);
}

// Store the first n (< width) lanes.
template <class S, class T>
inline void store_n(T* p, typename S::V v, int64_t n) {
  T tmp[S::kWidth];
  S::store(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}

// dst[i * dst_row + j * dst_col] = Σ_k w[i * ldw + k] * u[j * ldu + k], k < d.
template <class S, class T, int MR, int NR>
inline void dot_tile(const T* w, int64_t ldw, const float* u, int64_t ldu, int64_t d,
                     float* dst, int64_t dst_row, int64_t dst_col) {
  using V = typename S::V;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = S::zero();
  int64_t k = 0;
  for (; k + S::kWidth <= d; k += S::kWidth) {
    V wv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) wv[i] = S::load(w + i * ldw + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const V uv = S::load(u + j * ldu + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = S::fma(wv[i], uv, acc[i][j]);
    }
  }
  if (k < d) {
    const int64_t n = d - k;
    V wv[MR];
    for (int i = 0; i < MR; ++i) wv[i] = load_n<S>(w + i * ldw + k, n);
    for (int j = 0; j < NR; ++j) {
      const V uv = load_n<S>(u + j * ldu + k, n);
      for (int i = 0; i < MR; ++i) acc[i][j] = S::fma(wv[i], uv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) dst[i * dst_row + j * dst_col] = S::sum(acc[i][j]);
}

template <class S, class T, int MR>
inline void dot_tile_cols(int nr, const T* w, int64_t ldw, const float* u, int64_t ldu,
                          int64_t d, float* dst, int64_t dst_row, int64_t dst_col) {
  switch (nr) {
#define EAS_DOT_CASE(N)                                                        \
  case N:                                                                      \
    if constexpr (N <= S::kDotCols)                                            \
      dot_tile<S, T, MR, N>(w, ldw, u, ldu, d, dst, dst_row, dst_col);         \
    break;
    EAS_DOT_CASE(1)
    EAS_DOT_CASE(2)
    EAS_DOT_CASE(3)
    EAS_DOT_CASE(4)
    EAS_DOT_CASE(5)
    EAS_DOT_CASE(6)
#undef EAS_DOT_CASE
  }
}

// Any tile up to kDotRows x kDotCols (at most 6 x 6).
template <class S, class T>
inline void dot_tile_any(int mr, int nr, const T* w, int64_t ldw, const float* u, int64_t ldu,
                         int64_t d, float* dst, int64_t dst_row, int64_t dst_col) {
  static_assert(S::kDotRows <= 6 && S::kDotCols <= 6, "dot tiles are at most 6 x 6");
  switch (mr) {
#define EAS_DOT_ROWS(M)                                                        \
  case M:                                                                      \
    if constexpr (M <= S::kDotRows)                                            \
      dot_tile_cols<S, T, M>(nr, w, ldw, u, ldu, d, dst, dst_row, dst_col);    \
    break;
    EAS_DOT_ROWS(1)
    EAS_DOT_ROWS(2)
    EAS_DOT_ROWS(3)
    EAS_DOT_ROWS(4)
    EAS_DOT_ROWS(5)
    EAS_DOT_ROWS(6)
#undef EAS_DOT_ROWS
  }
}

// dst (rows [row0, row1) of the n x out product U Wᵀ, or its transpose) for one block of W
// rows: for each group of kDotCols rows of U, every kDotRows-row tile of the block. The
// block's rows of W stay in cache across the groups; dst[o, j] is at o*dst_row + j*dst_col.
template <class S, class T>
inline void dot_block(const T* w, int64_t ldw, int64_t row0, int64_t row1, const float* u,
                      int64_t n, int64_t d, float* dst, int64_t dst_row, int64_t dst_col) {
  for (int64_t j0 = 0; j0 < n; j0 += S::kDotCols) {
    const int nr = static_cast<int>(n - j0 < S::kDotCols ? n - j0 : S::kDotCols);
    for (int64_t i0 = row0; i0 < row1; i0 += S::kDotRows) {
      const int mr = static_cast<int>(row1 - i0 < S::kDotRows ? row1 - i0 : S::kDotRows);
      dot_tile_any<S, T>(mr, nr, w + i0 * ldw, ldw, u + j0 * d, d, d,
                         dst + i0 * dst_row + j0 * dst_col, dst_row, dst_col);
    }
  }
}

// How axpy stores its results: kInPlace (plain stores, the low-rank add, whose output is
// read next) or kStreamChecked (the merge's W', which this kernel does not read again:
// non-temporal stores where aligned, no read-for-ownership of the destination's lines, and
// every stored value, rounded to T, checked finite as it is stored).
enum class AxpyStore { kInPlace, kStreamChecked };

// MR rows x NV vectors starting at column c (NV * width columns, all inside the row):
// src rows at `src` (stride lds), results rounded once into dst rows (stride ldd_out).
// Returns whether every stored value is finite (always true for kInPlace).
template <class S, class T, int MR, int NV, AxpyStore kStore, class D>
inline bool axpy_tile(const T* src, int64_t lds, T* dst, int64_t ldo, const float* p,
                      int64_t ldp, const D* dmat, int64_t ldd, int64_t rank) {
  using V = typename S::V;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[i][c] = S::zero();
  for (int64_t k = 0; k < rank; ++k) {
    V dv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) dv[c] = S::load(dmat + k * ldd + c * S::kWidth);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V pk = S::set1(p[i * ldp + k]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[i][c] = S::fma(pk, dv[c], acc[i][c]);
    }
  }
  // x·0 + check stays 0 for finite stored values and turns NaN for an Inf or NaN one
  V check = S::zero();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      const V sum = S::add(S::load(src + i * lds + c * S::kWidth), acc[i][c]);
      T* out = dst + i * ldo + c * S::kWidth;
      if constexpr (kStore == AxpyStore::kStreamChecked) {
        check = S::fma(S::stream(out, sum), S::zero(), check);
      } else {
        S::store(out, sum);
      }
    }
  return kStore == AxpyStore::kInPlace || is_finite(S::sum(check));
}

// One row, columns [c, c + n) with n < width (the tail of a row); whether the stored values
// are finite (always true for kInPlace).
template <class S, class T, AxpyStore kStore, class D>
inline bool axpy_tail(const T* src, T* dst, const float* p, const D* dmat, int64_t ldd,
                      int64_t rank, int64_t n) {
  using V = typename S::V;
  V acc = S::zero();
  for (int64_t k = 0; k < rank; ++k) acc = S::fma(S::set1(p[k]), load_n<S>(dmat + k * ldd, n), acc);
  store_n<S>(dst, S::add(load_n<S>(src, n), acc), n);
  bool finite = true;
  if constexpr (kStore == AxpyStore::kStreamChecked)
    for (int64_t j = 0; j < n; ++j) finite = finite && is_finite(to_float(dst[j]));
  return finite;
}

// Rows [0, mr) of a block (mr <= kAxpyRows), columns [0, n): dst = round(src + P D), with
// D's rows `ldd` floats apart; whether every stored value is finite (kStreamChecked).
template <class S, class T, int MR, AxpyStore kStore, class D>
inline bool axpy_rows(const T* src, int64_t lds, T* dst, int64_t ldo, const float* p,
                      int64_t ldp, const D* dmat, int64_t ldd, int64_t n, int64_t rank) {
  constexpr int64_t kStep = S::kAxpyVecs * S::kWidth;
  bool finite = true;
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep)
    finite = axpy_tile<S, T, MR, S::kAxpyVecs, kStore>(src + c, lds, dst + c, ldo, p, ldp,
                                                        dmat + c, ldd, rank) && finite;
  for (; c + S::kWidth <= n; c += S::kWidth)
    finite = axpy_tile<S, T, MR, 1, kStore>(src + c, lds, dst + c, ldo, p, ldp, dmat + c, ldd,
                                            rank) && finite;
  if (c < n)
    for (int i = 0; i < MR; ++i)
      finite = axpy_tail<S, T, kStore>(src + i * lds + c, dst + i * ldo + c, p + i * ldp,
                                       dmat + c, ldd, rank, n - c) && finite;
  return finite;
}

template <class S, class T, AxpyStore kStore, class D>
inline bool axpy_rows_any(int mr, const T* src, int64_t lds, T* dst, int64_t ldo,
                          const float* p, int64_t ldp, const D* dmat, int64_t ldd,
                          int64_t n, int64_t rank) {
  static_assert(S::kAxpyRows <= 12, "axpy tiles have at most 12 rows");
  switch (mr) {
#define EAS_AXPY_ROWS(M)                                                              \
  case M:                                                                             \
    if constexpr (M <= S::kAxpyRows)                                                  \
      return axpy_rows<S, T, M, kStore>(src, lds, dst, ldo, p, ldp, dmat, ldd, n, rank); \
    break;
    EAS_AXPY_ROWS(1)
    EAS_AXPY_ROWS(2)
    EAS_AXPY_ROWS(3)
    EAS_AXPY_ROWS(4)
    EAS_AXPY_ROWS(5)
    EAS_AXPY_ROWS(6)
    EAS_AXPY_ROWS(7)
    EAS_AXPY_ROWS(8)
    EAS_AXPY_ROWS(9)
    EAS_AXPY_ROWS(10)
    EAS_AXPY_ROWS(11)
    EAS_AXPY_ROWS(12)
#undef EAS_AXPY_ROWS
  }
  return true;
}

}  // namespace eas::cpu
