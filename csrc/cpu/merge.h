// Merge of a frozen PIA into the linear layers that read it (EAS_SPEC §4), CPU.
//
// For every target W (out x d, storage type T) of one site, with W_u (r x d), β (d) and
// W_d1 (r x d) in fp32:
//
//   Q  = W [W_u; β]ᵀ                 (out x (r+1)): P = Q[:, :r] = W W_uᵀ, Q[:, r] = W βᵀ
//   W' = round(W + P W_d1)           in place; fp32 accumulation, one rounding
//   b' = round(b + W βᵀ)             into new_bias
//
// in three phases over all targets of the site:
//   1. per block of rows: Q by register-tiled dot products, then a bitwise copy of the
//      block into `pristine` (non-temporal stores; skipped when the caller knows `pristine`
//      already holds W, see MergeTarget::copy_pristine) and the row maxima max_j |W[o, j]|;
//   2. check, before any write to W: refuse the merge if an entry of Q or b' is not
//      finite, or if one of W' could be. A row is cleared by the bound
//      max|W_o| + Σ_k |P_ok| max|W_d1[k, :]| < max_finite(T) / 2; a row the bound does not
//      clear is computed exactly (the arithmetic of phase 3) into a scratch row and scanned;
//   3. per block of rows: W' in place, one streaming read-modify-write of W.
// 4·out·d·r flops in all; W is read twice and written once, the copy written once.
#pragma once

#include <cstdint>

#include "../abi.h"
#include "parallel.h"
#include "tiles.h"

namespace eas::cpu {

namespace merge_detail {

// Rows per block of work: about 256 KiB of W, a multiple of both tile heights.
template <class S, class T>
inline int64_t block_rows(int64_t d) {
  constexpr int64_t unit = S::kDotRows * S::kAxpyRows;
  const int64_t units = (256 * 1024) / (unit * d * static_cast<int64_t>(sizeof(T)));
  return unit * (units > 1 ? units : 1);
}

template <class S, class T>
inline float row_max_abs(const T* w, int64_t d) {
  typename S::V m = S::zero();
  int64_t k = 0;
  for (; k + S::kWidth <= d; k += S::kWidth) m = S::max(m, S::abs(S::load(w + k)));
  float result = S::hmax(m);
  for (; k < d; ++k) {
    const float x = __builtin_fabsf(to_float(w[k]));
    result = x > result ? x : result;
  }
  return result;
}

// max_j |D[k, j]| in double; NaN or Inf anywhere in row k gives +Inf.
template <class S>
inline double down_row_max(const float* dk, int64_t d) {
  double m = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    if (!is_finite(dk[j])) return __builtin_inf();
    const double x = __builtin_fabs(static_cast<double>(dk[j]));
    m = x > m ? x : m;
  }
  return m;
}

// Whether row o of the target can be merged: finite Q row, finite rounded bias, finite W'.
template <class S, class T>
inline bool check_row(const MergeArgs& a, const MergeTarget& tg, int64_t o, const float* q_row,
                      float max_abs, const double* down_max) {
  const int64_t r = a.rank;
  for (int64_t k = 0; k <= r; ++k)
    if (!is_finite(q_row[k])) return false;
  const float bias = tg.bias != nullptr ? to_float(static_cast<const T*>(tg.bias)[o]) : 0.0f;
  const T new_bias = from_float<T>(bias + q_row[r]);
  static_cast<T*>(tg.new_bias)[o] = new_bias;
  if (!is_finite(to_float(new_bias))) return false;
  double bound = max_abs;
  for (int64_t k = 0; k < r; ++k) bound += __builtin_fabs(static_cast<double>(q_row[k])) * down_max[k];
  if (bound < max_finite<T>() / 2) return true;
  // Not cleared by the bound: compute the row as phase 3 will and look.
  const T* w = static_cast<const T*>(tg.weight) + o * tg.ld;
  T* merged = new T[a.d];
  axpy_rows<S, T, 1>(w, tg.ld, merged, a.d, q_row, r + 1, a.down, a.d, a.d, r);
  bool finite = true;
  for (int64_t j = 0; j < a.d && finite; ++j) finite = is_finite(to_float(merged[j]));
  delete[] merged;
  return finite;
}

}  // namespace merge_detail

// Merge one site (see the top of this file); `a.scratch` starts with (Σ out)·(r + 2) floats.
// Returns -1 when every target was written, else the index of the first target whose
// merged weight or bias would hold NaN/Inf; then no weight was written (new_bias and
// pristine may have been).
template <class S, class T>
int merge(const MergeArgs& a) {
  const int64_t d = a.d, r = a.rank, ldq = r + 1;
  const int nt = a.num_targets;
  const int64_t rows_per_block = merge_detail::block_rows<S, T>(d);
  // Targets' first block and first row (in the shared scratch), as prefix sums.
  int64_t* first_block = new int64_t[2 * (nt + 1)];
  int64_t* first_row = first_block + nt + 1;
  first_block[0] = first_row[0] = 0;
  for (int t = 0; t < nt; ++t) {
    const int64_t out = a.targets[t].out;
    first_block[t + 1] = first_block[t] + (out + rows_per_block - 1) / rows_per_block;
    first_row[t + 1] = first_row[t] + out;
  }
  const int64_t num_blocks = first_block[nt], total_rows = first_row[nt];
  float* q = a.scratch;                          // (total_rows, r + 1)
  float* maxima = a.scratch + total_rows * ldq;  // (total_rows,)
  const int threads = threads_for(a.num_threads, 2 * total_rows * d * r);
  auto target_of_block = [&](int64_t b) {
    int t = 0;
    while (b >= first_block[t + 1]) ++t;
    return t;
  };

  // Phase 1: Q, pristine copy, row maxima.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int t = target_of_block(b);
    const MergeTarget& tg = a.targets[t];
    const int64_t row0 = (b - first_block[t]) * rows_per_block;
    const int64_t row1 = row0 + rows_per_block < tg.out ? row0 + rows_per_block : tg.out;
    const T* w = static_cast<const T*>(tg.weight);
    T* pristine = static_cast<T*>(tg.pristine);
    float* q_target = q + first_row[t] * ldq;
    dot_block<S, T>(w, tg.ld, row0, row1, a.up, r + 1, d, q_target, ldq, 1);
    for (int64_t o = row0; o < row1; ++o) {
      maxima[first_row[t] + o] = merge_detail::row_max_abs<S, T>(w + o * tg.ld, d);
      if (tg.copy_pristine)
        S::copy_stream(pristine + o * d, w + o * tg.ld, d * static_cast<int64_t>(sizeof(T)));
    }
    S::fence();
  }

  // Phase 2: check every row of every target before any write to W.
  double* down_max = new double[r];
  for (int64_t k = 0; k < r; ++k) down_max[k] = merge_detail::down_row_max<S>(a.down + k * d, d);
  int* refused = new int[nt];
  for (int t = 0; t < nt; ++t) refused[t] = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t row = 0; row < total_rows; ++row) {
    int t = 0;
    while (row >= first_row[t + 1]) ++t;
    const int64_t o = row - first_row[t];
    if (!merge_detail::check_row<S, T>(a, a.targets[t], o, q + row * ldq, maxima[row], down_max)) {
#pragma omp atomic write
      refused[t] = 1;
    }
  }
  int first_refused = -1;
  for (int t = nt - 1; t >= 0; --t)
    if (refused[t]) first_refused = t;
  delete[] refused;
  delete[] down_max;

  // Phase 3: W' = round(W + P W_d1), in place.
  if (first_refused < 0) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int t = target_of_block(b);
      const MergeTarget& tg = a.targets[t];
      const int64_t row0 = (b - first_block[t]) * rows_per_block;
      const int64_t row1 = row0 + rows_per_block < tg.out ? row0 + rows_per_block : tg.out;
      T* w = static_cast<T*>(tg.weight);
      const float* q_target = q + first_row[t] * ldq;
      for (int64_t i0 = row0; i0 < row1; i0 += S::kAxpyRows) {
        const int mr = static_cast<int>(row1 - i0 < S::kAxpyRows ? row1 - i0 : S::kAxpyRows);
        axpy_rows_any<S, T>(mr, w + i0 * tg.ld, tg.ld, w + i0 * tg.ld, tg.ld,
                            q_target + i0 * ldq, ldq, a.down, d, d, r);
      }
    }
  }
  delete[] first_block;
  return first_refused;
}

}  // namespace eas::cpu
