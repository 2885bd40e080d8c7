// The batched low-rank path (EAS_SPEC §4), CPU.
//
// A frozen PIA with up projections W_u1ᵀ, W_u2ᵀ (r x d), biases b_u1, b_u2 (d) and example
// e's state (α₁, α₂, c) has W_u^{(e)} = α₁ W_u1ᵀ + α₂ W_u2ᵀ and β^{(e)} = c W_u^{(e)} +
// α₁ b_u1 + α₂ b_u2, so for a target W (out x d, storage type T) the per-example factors
// M_e = W_u^{(e)} Wᵀ and g_e = β^{(e)} Wᵀ are combinations of four state-free ones:
//
//   factors: F = U Wᵀ ((2r + 2) x out, accumulated in fp32 and kept in the layer's storage
//            type: half the bytes for bf16/fp16 layers), U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2]:
//            A = W_u1ᵀ Wᵀ, C = W_u2ᵀ Wᵀ, a₁ = b_u1 Wᵀ, a₂ = b_u2 Wᵀ; (2r + 2)·out·d
//            multiply-adds once for the batch, whatever B; register-tiled dot products over
//            blocks of W rows that stay in cache while U streams past them;
//   add:     y[b, t, :] = round(y[b, t, :] + Σ_k κ[b, t, k] F[k, :]) in place, with
//            p = proj[b, t, :] + c_b and κ = [α₁ p, α₂ p, α₁, α₂] (the sum is from zero,
//            k ascending, then added to y once), which is y + proj M_b + g_b. Per decoded
//            token (2r + 2)·out multiply-adds per example (proj = x W_d1ᵀ, d·r, is the
//            site's), one read and one write of y, and F read once per step for the whole
//            batch: a column chunk of F stays in L1 while every row of y passes it.
#pragma once

#include <cstdint>
#include <vector>

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
  const int64_t r = a.rank, width = 2 * r + 2, rows = a.batch * a.tokens;
  // κ of every (b, t) row, row-major.
  std::vector<float> coefficients(static_cast<size_t>(rows * width));
  const T* proj = static_cast<const T*>(a.proj);
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* mix = a.mix + b * (r + 2);
    const float alpha1 = mix[0], alpha2 = mix[1];
    for (int64_t t = 0; t < a.tokens; ++t) {
      float* kappa = coefficients.data() + (b * a.tokens + t) * width;
      const T* p = proj + b * a.p_sb + t * a.p_st;
      for (int64_t k = 0; k < r; ++k) {
        const float shifted = to_float(p[k * a.p_sk]) + mix[2 + k];
        kappa[k] = alpha1 * shifted;
        kappa[r + k] = alpha2 * shifted;
      }
      kappa[2 * r] = alpha1;
      kappa[2 * r + 1] = alpha2;
    }
  }
  // Rows of y in runs of one stride: all B·n rows when the (b, t) rows are evenly spaced,
  // else one run per example.
  const bool even = a.tokens == 1 || a.y_sb == a.tokens * a.y_st;
  const int64_t runs = even ? 1 : a.batch, run_rows = even ? rows : a.tokens;
  const int64_t stride = a.tokens == 1 ? a.y_sb : a.y_st;
  constexpr int64_t kChunk = S::kAxpyVecs * S::kWidth;
  const int64_t chunks = (a.out + kChunk - 1) / kChunk;
  T* y = static_cast<T*>(a.y);
  const T* factor = static_cast<const T*>(a.factor);
  const int threads = threads_for(a.num_threads, rows * width * a.out);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t run = 0; run < runs; ++run) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t c0 = chunk * kChunk;
      const int64_t n = a.out - c0 < kChunk ? a.out - c0 : kChunk;
      T* y_run = y + run * a.y_sb + c0;
      const float* kappa_run = coefficients.data() + run * run_rows * width;
      for (int64_t i0 = 0; i0 < run_rows; i0 += S::kAxpyRows) {
        const int mr = static_cast<int>(run_rows - i0 < S::kAxpyRows ? run_rows - i0 : S::kAxpyRows);
        T* rows_at = y_run + i0 * stride;
        axpy_rows_any<S, T, AxpyStore::kInPlace>(mr, rows_at, stride, rows_at, stride,
                                                 kappa_run + i0 * width, width, factor + c0,
                                                 a.out, n, width);
      }
    }
  }
}

}  // namespace eas::cpu
