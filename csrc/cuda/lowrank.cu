// The batched low-rank path (EAS_SPEC §4), CUDA; the math of csrc/cpu/lowrank.h.
//
//   factors: F = U Wᵀ, U = [W_u1ᵀ; W_u2ᵀ; b_u1; b_u2] ((2r + 2) x d, fp32): dots_kernel
//            writing (2r + 2) x out fp32, once for the batch (kept in the layer's storage
//            type, rounded by Python);
//   add:     y[b, t, c] = round(y[b, t, c] + Σ_k κ[b, t, k] F[k, c]), κ = [α₁ p, α₂ p, α₁, α₂]
//            with p = proj[b, t, :] + c_b; the sum from zero, k ascending with fmaf, then
//            added to y once. One thread per output column (blocks of 256 columns), each
//            block taking kRows (b, t) rows at a time with their κ staged in shared memory,
//            so that a column of F is read once per kRows rows.
#include <string>

#include "common.cuh"
#include "dots.cuh"
#include "launch.h"

namespace eas::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;

template <class T>
__global__ void add_kernel(T* __restrict__ y, int64_t rows, int64_t tokens, int64_t out,
                           int64_t rank, int64_t y_sb, int64_t y_st, const T* __restrict__ proj,
                           int64_t p_sb, int64_t p_st, int64_t p_sk, const float* __restrict__ mix,
                           const T* __restrict__ factor) {
  extern __shared__ float coefficients[];  // kRows x (2 rank + 2): κ of the block's rows
  const int64_t width = 2 * rank + 2;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.y) * kRows) {
    const int count = rows - row0 < kRows ? static_cast<int>(rows - row0) : kRows;
    __syncthreads();  // the previous rows' reads of `coefficients` are done
    for (int64_t i = threadIdx.x; i < kRows * (rank + 1); i += kThreads) {
      const int j = static_cast<int>(i / (rank + 1));
      const int64_t k = i % (rank + 1);
      float* kappa = coefficients + j * width;
      if (j >= count) {  // rows past the end: zeros, never stored
        if (k < rank) kappa[k] = kappa[rank + k] = 0.0f;
        else kappa[2 * rank] = kappa[2 * rank + 1] = 0.0f;
        continue;
      }
      const int64_t b = (row0 + j) / tokens, t = (row0 + j) % tokens;
      const float* m = mix + b * (rank + 2);
      if (k < rank) {
        const float shifted = to_float(proj[b * p_sb + t * p_st + k * p_sk]) + m[2 + k];
        kappa[k] = m[0] * shifted;
        kappa[rank + k] = m[1] * shifted;
      } else {
        kappa[2 * rank] = m[0];
        kappa[2 * rank + 1] = m[1];
      }
    }
    __syncthreads();
    if (c < out) {
      float delta[kRows];
#pragma unroll
      for (int j = 0; j < kRows; ++j) delta[j] = 0.0f;
      for (int64_t k = 0; k < width; ++k) {
        const float f = to_float(factor[k * out + c]);
#pragma unroll
        for (int j = 0; j < kRows; ++j) delta[j] = fmaf(coefficients[j * width + k], f, delta[j]);
      }
#pragma unroll
      for (int j = 0; j < kRows; ++j) {  // unrolled: delta stays in registers
        if (j >= count) break;
        const int64_t b = (row0 + j) / tokens, t = (row0 + j) % tokens;
        T* yp = y + b * y_sb + t * y_st + c;
        *yp = from_float<T>(to_float(*yp) + delta[j]);
      }
    }
  }
}

}  // namespace

void lowrank_factors(const FactorArgs& a, int device, void* stream) {
  const dim3 grid = dots_grid(a.out, a.n, "lowrank_factors",
                              "out " + std::to_string(a.out) + ", d " + std::to_string(a.d) +
                                  ", n " + std::to_string(a.n));  // n <= 65535 * 64
  const DeviceGuard guard(device);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dots<T>(grid, static_cast<const T*>(a.weight), a.ld, a.out, a.up, a.n, a.d, a.dst, 1,
                   a.out, static_cast<cudaStream_t>(stream));
    return 0;
  });
  check(cudaGetLastError(), "lowrank_factors");
}

void lowrank_add(const LowrankAddArgs& a, int device, void* stream) {
  // kRows rows of κ (2 rank + 2 floats each) in the 48 KiB of shared memory a launch gets.
  constexpr int64_t kMaxRank = (48 * 1024 / (sizeof(float) * kRows) - 2) / 2;
  if (a.rank > kMaxRank)
    throw std::invalid_argument("lowrank_add supports rank <= " + std::to_string(kMaxRank));
  const size_t shared = sizeof(float) * kRows * static_cast<size_t>(2 * a.rank + 2);
  const int64_t rows = a.batch * a.tokens;
  const int64_t row_blocks = blocks(rows, kRows);  // blocks along y loop over the rest
  const int64_t grid_rows = row_blocks < kMaxGridYZ ? row_blocks : kMaxGridYZ;
  const dim3 grid = grid_of(blocks(a.out, kThreads), grid_rows, 1, "lowrank_add", "add_kernel",
                            "batch " + std::to_string(a.batch) + ", tokens " +
                                std::to_string(a.tokens) + ", out " + std::to_string(a.out) +
                                ", rank " + std::to_string(a.rank));
  const DeviceGuard guard(device);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    add_kernel<T><<<grid, kThreads, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(a.y), rows, a.tokens, a.out, a.rank, a.y_sb, a.y_st,
        static_cast<const T*>(a.proj), a.p_sb, a.p_st, a.p_sk, a.mix,
        static_cast<const T*>(a.factor));
    return 0;
  });
  check(cudaGetLastError(), "lowrank_add");
}

}  // namespace eas::cuda
