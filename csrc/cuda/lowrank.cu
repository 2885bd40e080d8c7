// The batched low-rank path (EAS_SPEC §4), CUDA; the math of csrc/cpu/lowrank.h.
//
//   factors: F = U Wᵀ, U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2] ((2r + 2) x d, fp32): dots_kernel
//            writing (2r + 2) x out fp32, once for the batch (kept in the layer's storage
//            type, rounded by Python); one read of W for r <= 63 (2r + 2 <= 128 columns);
//   add:     y[b, t, c] = round(y[b, t, c] + Σ_k κ[b, t, k] F[k, c]), κ = [α₁ p, α₂ p, α₁, α₂]
//            with p = proj[b, t, :] + c_b; the sum from zero, k ascending with fmaf, then
//            added to y once. One thread per output column (blocks of 256 columns), each
//            block taking kRows (b, t) rows at a time — 8 when the call has at most 8 rows,
//            else 32 — with their κ staged in shared memory kChunk coefficients at a time
//            (any rank fits), so that F is read once per kRows rows: once per decode step
//            at batch <= 32.
#include <string>

#include "common.cuh"
#include "dots.cuh"
#include "launch.h"

namespace eas::cuda {
namespace {

constexpr int kThreads = 256, kChunk = 64;

// κ[row, k] of the flattened (b, t) row `row` (EAS_SPEC §4, see the file comment).
template <class T>
__device__ __forceinline__ float kappa(int64_t row, int64_t k, int64_t tokens, int64_t rank,
                                       const T* __restrict__ proj, int64_t p_sb, int64_t p_st,
                                       int64_t p_sk, const float* __restrict__ mix) {
  const int64_t b = row / tokens, t = row % tokens;
  const float* m = mix + b * (rank + 2);  // α₁, α₂, c
  if (k >= 2 * rank) return m[k - 2 * rank];
  const int path = k < rank ? 0 : 1;
  const int64_t i = k - path * rank;
  return m[path] * (to_float(proj[b * p_sb + t * p_st + i * p_sk]) + m[2 + i]);
}

template <class T, int kRows>
__global__ void __launch_bounds__(kThreads)
    add_kernel(T* __restrict__ y, int64_t rows, int64_t tokens, int64_t out, int64_t rank,
               int64_t y_sb, int64_t y_st, const T* __restrict__ proj, int64_t p_sb,
               int64_t p_st, int64_t p_sk, const float* __restrict__ mix,
               const T* __restrict__ factor) {
  __shared__ float coefficients[kRows][kChunk];  // κ of the block's rows, one chunk of k
  const int64_t width = 2 * rank + 2;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.y) * kRows) {
    const int count = rows - row0 < kRows ? static_cast<int>(rows - row0) : kRows;
    float delta[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) delta[j] = 0.0f;
    for (int64_t k0 = 0; k0 < width; k0 += kChunk) {
      const int chunk = width - k0 < kChunk ? static_cast<int>(width - k0) : kChunk;
      __syncthreads();  // the previous chunk's reads of `coefficients` are done
      for (int i = threadIdx.x; i < kRows * kChunk; i += kThreads) {
        const int j = i / kChunk, kk = i % kChunk;  // rows past the end: zeros, never stored
        coefficients[j][kk] = j < count && kk < chunk
                                  ? kappa(row0 + j, k0 + kk, tokens, rank, proj, p_sb, p_st,
                                          p_sk, mix)
                                  : 0.0f;
      }
      __syncthreads();
      if (c < out)
        for (int kk = 0; kk < chunk; ++kk) {
          const float f = to_float(factor[(k0 + kk) * out + c]);
#pragma unroll
          for (int j = 0; j < kRows; ++j) delta[j] = fmaf(coefficients[j][kk], f, delta[j]);
        }
    }
    if (c < out)
#pragma unroll
      for (int j = 0; j < kRows; ++j) {  // unrolled: delta stays in registers
        if (j >= count) break;
        const int64_t b = (row0 + j) / tokens, t = (row0 + j) % tokens;
        T* yp = y + b * y_sb + t * y_st + c;
        *yp = from_float<T>(to_float(*yp) + delta[j]);
      }
  }
}

}  // namespace

void lowrank_factors(const FactorArgs& a, int device, void* stream) {
  const size_t element = a.dtype == kFloat32 ? 4 : 2;
  const DotsLaunch launch =
      dots_launch(a.weight, a.ld, element, a.out, a.n, "lowrank_factors",
                  "out " + std::to_string(a.out) + ", d " + std::to_string(a.d) + ", n " +
                      std::to_string(a.n));  // n <= 65535 * 128
  const DeviceGuard guard(device);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dots<T>(launch, static_cast<const T*>(a.weight), a.ld, a.out, a.up, a.n, a.d, a.dst,
                   1, a.out, nullptr, static_cast<cudaStream_t>(stream));
    return 0;
  });
  check(cudaGetLastError(), "lowrank_factors");
}

void lowrank_add(const LowrankAddArgs& a, int device, void* stream) {
  const int64_t rows = a.batch * a.tokens;
  const int rows_per_block = rows <= 8 ? 8 : 32;
  const int64_t row_blocks = blocks(rows, rows_per_block);  // blocks along y loop over the rest
  const int64_t grid_rows = row_blocks < kMaxGridYZ ? row_blocks : kMaxGridYZ;
  const dim3 grid = grid_of(blocks(a.out, kThreads), grid_rows, 1, "lowrank_add", "add_kernel",
                            "batch " + std::to_string(a.batch) + ", tokens " +
                                std::to_string(a.tokens) + ", out " + std::to_string(a.out) +
                                ", rank " + std::to_string(a.rank));
  const DeviceGuard guard(device);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto go = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<T*>(a.y), rows, a.tokens, a.out, a.rank, a.y_sb, a.y_st,
          static_cast<const T*>(a.proj), a.p_sb, a.p_st, a.p_sk, a.mix,
          static_cast<const T*>(a.factor));
    };
    if (rows_per_block == 8) go(add_kernel<T, 8>);
    else go(add_kernel<T, 32>);
    return 0;
  });
  check(cudaGetLastError(), "lowrank_add");
}

}  // namespace eas::cuda
