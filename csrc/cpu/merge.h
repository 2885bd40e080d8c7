// Merge of a frozen PIA into the linear layers that read it (EAS_SPEC §4), CPU.
//
// For every target W (out x d, storage type T), with W_u (r x d), β (d) and W_d1 (r x d)
// of its site (MergeTarget::site) in fp32:
//
//   Q  = W [W_u; β]ᵀ                 (out x (r+1)): P = Q[:, :r] = W W_uᵀ, Q[:, r] = W βᵀ,
//                                    or from the target's factors Fᵀ = [A | C | a₁ | a₂]
//                                    (out x (2r+2)) and the site's mix (α₁, α₂, c):
//                                    P = α₁ A + α₂ C, Q[:, r] = P cᵀ + α₁ a₁ + α₂ a₂
//   W' = round(W + P W_d1)           into `merged`; fp32 accumulation, one rounding
//   b' = round(b + W βᵀ)             into new_bias
//
// in one pass over blocks of rows (of all targets of all sites, in parallel): Q of the block
// by register-tiled dot products (or from the factors' rows), then W' of the block while
// its rows of W are still in cache (with non-temporal stores where aligned: W' is not read
// again here), and b'. Every entry of Q, b' and W' is checked finite as it is produced; W
// itself is never written (the caller swaps `merged` in). 4·out·d·r flops (2·out·d·r from
// factors); W read once from memory, `merged` written once.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

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

// `rows` rows of Q (r + 1 floats each) into `q` from as many rows of the factors Fᵀ
// (2r + 2 floats each) and the mix (α₁, α₂, c), in the order of operations of
// csrc/cuda/merge.cu's factors_kernel. A template on the SIMD layer, as every kernel here,
// so that each ISA's file compiles its own copy with its own instructions (fused
// multiply-adds in hardware).
template <class S>
inline void q_from_factors(const float* factors, const float* mix, int64_t r, int64_t rows,
                           float* q) {
  const float a1 = mix[0], a2 = mix[1];
  const float* c = mix + 2;
  const int64_t ldf = 2 * r + 2, ldq = r + 1;
  for (int64_t o = 0; o < rows; ++o) {
    const float* f = factors + o * ldf;
    float* q_row = q + o * ldq;
    for (int64_t k = 0; k < r; ++k) q_row[k] = std::fma(a2, f[r + k], a1 * f[k]);
  }
  // Q[:, r] = P cᵀ + α₁ a₁ + α₂ a₂, k ascending from zero; 8 rows at a time, so that their
  // chains of dependent multiply-adds overlap
  constexpr int64_t kRows = 8;
  for (int64_t o0 = 0; o0 < rows; o0 += kRows) {
    const int64_t m = rows - o0 < kRows ? rows - o0 : kRows;
    float acc[kRows] = {};
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < m; ++i) acc[i] = std::fma(q[(o0 + i) * ldq + k], c[k], acc[i]);
    for (int64_t i = 0; i < m; ++i) {
      const float* f = factors + (o0 + i) * ldf;
      q[(o0 + i) * ldq + r] = std::fma(a2, f[2 * r + 1], std::fma(a1, f[2 * r], acc[i]));
    }
  }
}

// Rows [row0, row1) of one target: Q (from W into `scratch`, the target's (out, r + 1)
// floats; from its factors into a buffer of the thread's, which stays in cache), b' and
// W'; whether all of them are finite.
template <class S, class T>
inline bool merge_rows(const MergeArgs& a, const MergeTarget& tg, int64_t row0, int64_t row1,
                       float* scratch) {
  const MergeSite& site = a.sites[tg.site];
  const int64_t d = a.d, r = site.rank, ldq = r + 1;
  const T* w = static_cast<const T*>(tg.weight);
  T* merged = static_cast<T*>(tg.merged);
  const float* q0;  // Q's row row0; row o at q0 + (o - row0) * ldq
  if (tg.factors != nullptr) {
    thread_local std::vector<float> block_q;
    block_q.resize(static_cast<size_t>((row1 - row0) * ldq));
    q_from_factors<S>(tg.factors + row0 * (2 * r + 2), site.mix, r, row1 - row0, block_q.data());
    q0 = block_q.data();
  } else {
    dot_block<S, T>(w, tg.ld, row0, row1, site.up, r + 1, d, scratch, ldq, 1);
    q0 = scratch + row0 * ldq;
  }
  bool finite = true;
  for (int64_t o = row0; o < row1; ++o) {
    const float* q_row = q0 + (o - row0) * ldq;
    for (int64_t k = 0; k <= r; ++k) finite = finite && is_finite(q_row[k]);
    const float bias = tg.bias != nullptr ? to_float(static_cast<const T*>(tg.bias)[o]) : 0.0f;
    const T new_bias = from_float<T>(bias + q_row[r]);
    static_cast<T*>(tg.new_bias)[o] = new_bias;
    finite = finite && is_finite(to_float(new_bias));
  }
  for (int64_t i0 = row0; i0 < row1; i0 += S::kAxpyRows) {
    const int mr = static_cast<int>(row1 - i0 < S::kAxpyRows ? row1 - i0 : S::kAxpyRows);
    finite = axpy_rows_any<S, T, AxpyStore::kStreamChecked>(
                 mr, w + i0 * tg.ld, tg.ld, merged + i0 * d, d, q0 + (i0 - row0) * ldq, ldq,
                 site.down, d, d, r) &&
             finite;
  }
  S::fence();  // the non-temporal stores of W' are visible before the kernel returns
  return finite;
}

}  // namespace merge_detail

// Merge every site (see the top of this file); `a.scratch` starts with Σ out·(r + 1)
// floats, the targets' Q in order (written for the targets without factors). Returns -1 when every target's W' and b' are finite,
// else the index of the first target with a NaN/Inf entry (its `merged` and `new_bias` are
// then incomplete; W is untouched).
template <class S, class T>
int merge(const MergeArgs& a) {
  const int64_t d = a.d;
  const int nt = a.num_targets;
  const int64_t rows_per_block = merge_detail::block_rows<S, T>(d);
  // Targets' first block and first Q float (in the shared scratch), as prefix sums.
  int64_t* first_block = new int64_t[2 * (nt + 1)];
  int64_t* first_q = first_block + nt + 1;
  first_block[0] = first_q[0] = 0;
  int64_t work = 0;
  for (int t = 0; t < nt; ++t) {
    const int64_t out = a.targets[t].out, r = a.sites[a.targets[t].site].rank;
    first_block[t + 1] = first_block[t] + (out + rows_per_block - 1) / rows_per_block;
    first_q[t + 1] = first_q[t] + out * (r + 1);
    work += 2 * out * d * r;
  }
  const int64_t num_blocks = first_block[nt];
  const int threads = threads_for(a.num_threads, work);
  int* refused = new int[nt];
  for (int t = 0; t < nt; ++t) refused[t] = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    int t = 0;
    while (b >= first_block[t + 1]) ++t;
    const MergeTarget& tg = a.targets[t];
    const int64_t row0 = (b - first_block[t]) * rows_per_block;
    const int64_t row1 = row0 + rows_per_block < tg.out ? row0 + rows_per_block : tg.out;
    if (!merge_detail::merge_rows<S, T>(a, tg, row0, row1, a.scratch + first_q[t])) {
#pragma omp atomic write
      refused[t] = 1;
    }
  }
  int first_refused = -1;
  for (int t = nt - 1; t >= 0; --t)
    if (refused[t]) first_refused = t;
  delete[] refused;
  delete[] first_block;
  return first_refused;
}

}  // namespace eas::cpu
