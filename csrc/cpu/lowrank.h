// The batched per-example low-rank path (EAS_SPEC §4), CPU.
//
// For B examples with mixed up projections W_u^{(e)} (r x d) and β^{(e)} (d), and a target
// W (out x d, storage type T):
//
//   factors: M_e = W_u^{(e)} Wᵀ (r x out), g_e = β^{(e)} Wᵀ (out), fp32, once per example:
//            dst = U Wᵀ with U = [W_u^{(0)}; ...; W_u^{(B-1)}; β^{(0)}; ...; β^{(B-1)}]
//            ((B r + B) x d), i.e. B(r+1)·out·d multiply-adds, register-tiled dot products
//            over blocks of W rows that stay in cache while U streams past them;
//   add:     y[b, t, :] = round(y[b, t, :] + g_b + Σ_k proj[b, t, k] M_b[k, :]) in place,
//            per decoded token r·out multiply-adds (proj = x W_d1ᵀ, d·r, is the site's),
//            one read and one write of y: no extra pass over x Wᵀ.
#pragma once

#include <cstdint>

#include "../abi.h"
#include "parallel.h"
#include "tiles.h"

namespace eas::cpu {

template <class S, class T>
void lowrank_factors(const FactorArgs& a) {
  const T* w = static_cast<const T*>(a.weight);
  // Blocks of W rows of about 256 KiB, so that each block is read from memory once.
  const int64_t unit = S::kDotRows;
  int64_t rows = unit * ((256 * 1024) / (unit * a.d * static_cast<int64_t>(sizeof(T))));
  rows = rows > unit ? rows : unit;
  const int64_t num_blocks = (a.out + rows - 1) / rows;
  const int threads = threads_for(a.num_threads, a.n * a.out * a.d);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t row0 = b * rows;
    const int64_t row1 = row0 + rows < a.out ? row0 + rows : a.out;
    dot_block<S, T>(w, a.ld, row0, row1, a.up, a.n, a.d, a.dst, 1, a.out);
  }
}

template <class S, class T>
void lowrank_add(const LowrankAddArgs& a) {
  using V = typename S::V;
  constexpr int kVecs = S::kAxpyVecs;
  constexpr int64_t kStep = kVecs * S::kWidth;
  const int64_t chunks = (a.out + kStep - 1) / kStep;
  T* y = static_cast<T*>(a.y);
  const T* proj = static_cast<const T*>(a.proj);
  const int threads = threads_for(a.num_threads, a.batch * a.tokens * a.rank * a.out);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t c0 = chunk * kStep;
      const float* m = a.factor + b * a.rank * a.out + c0;
      const float* g = a.offset + b * a.out + c0;
      for (int64_t t = 0; t < a.tokens; ++t) {
        T* yt = y + b * a.y_sb + t * a.y_st + c0;
        const T* pt = proj + b * a.p_sb + t * a.p_st;
        if (c0 + kStep <= a.out) {
          V acc[kVecs];
#pragma GCC unroll 8
          for (int c = 0; c < kVecs; ++c)
            acc[c] = S::add(S::load(yt + c * S::kWidth), S::load(g + c * S::kWidth));
          for (int64_t k = 0; k < a.rank; ++k) {
            const V pk = S::set1(to_float(pt[k * a.p_sk]));
#pragma GCC unroll 8
            for (int c = 0; c < kVecs; ++c)
              acc[c] = S::fma(pk, S::load(m + k * a.out + c * S::kWidth), acc[c]);
          }
#pragma GCC unroll 8
          for (int c = 0; c < kVecs; ++c) S::store(yt + c * S::kWidth, acc[c]);
        } else {  // the last, partial chunk of the row: one vector at a time
          for (int64_t c = c0; c < a.out; c += S::kWidth) {
            const int64_t n = a.out - c < S::kWidth ? a.out - c : S::kWidth;
            V acc = S::add(load_n<S>(yt + (c - c0), n), load_n<S>(g + (c - c0), n));
            for (int64_t k = 0; k < a.rank; ++k)
              acc = S::fma(S::set1(to_float(pt[k * a.p_sk])),
                           load_n<S>(m + k * a.out + (c - c0), n), acc);
            store_n<S>(yt + (c - c0), acc, n);
          }
        }
      }
    }
  }
}

}  // namespace eas::cpu
