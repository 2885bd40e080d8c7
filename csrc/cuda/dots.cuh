// C = A Bᵀ with fp32 accumulation: A (m x k, storage type T, rows `lda` apart), B (n x k,
// fp32, contiguous), C[i, j] at c[i * c_row + j * c_col]. Shared-memory tiles of 64 x 64
// outputs, 16 of k at a time; 256 threads, each 4 x 4 outputs.
//
// It computes P = W [W_u; β]ᵀ for the merge (n = r + 1) and [M; g] = U Wᵀ for the low-rank
// factors (A = W, written transposed through c_row = 1, c_col = out).
#pragma once

#include "common.cuh"

namespace eas::cuda {

constexpr int kDotTile = 64, kDotK = 16, kDotThreads = 256;

template <class T>
__global__ void __launch_bounds__(kDotThreads)
    dots_kernel(const T* __restrict__ a, int64_t lda, int64_t m, const float* __restrict__ b,
                int64_t n, int64_t k, float* __restrict__ c, int64_t c_row, int64_t c_col) {
  __shared__ float as[kDotK][kDotTile + 1];
  __shared__ float bs[kDotK][kDotTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDotTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kDotTile;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kDotK) {
    for (int e = threadIdx.x; e < kDotTile * kDotK; e += kDotThreads) {
      const int i = e / kDotK, kk = e % kDotK;
      const int64_t col = k0 + kk;
      as[kk][i] = (m0 + i < m && col < k) ? to_float(a[(m0 + i) * lda + col]) : 0.0f;
      bs[kk][i] = (n0 + i < n && col < k) ? b[(n0 + i) * k + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDotK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = as[kk][ty + 16 * i];
        bv[i] = bs[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (row < m && col < n) c[row * c_row + col * c_col] = acc[i][j];
    }
  }
}

// The grid of an m x n product: m tiles along x, n tiles along y (n <= 65535 * 64).
inline dim3 dots_grid(int64_t m, int64_t n, const char* op, const std::string& shape) {
  return grid_of(blocks(m, kDotTile), blocks(n, kDotTile), 1, op, "dots_kernel", shape);
}

// `grid` from dots_grid(m, n, ...), checked before the call launches anything.
template <class T>
void launch_dots(dim3 grid, const T* a, int64_t lda, int64_t m, const float* b, int64_t n,
                 int64_t k, float* c, int64_t c_row, int64_t c_col, cudaStream_t stream) {
  dots_kernel<T><<<grid, kDotThreads, 0, stream>>>(a, lda, m, b, n, k, c, c_row, c_col);
}

}  // namespace eas::cuda
