// C = A Bᵀ for a skinny B, with fp32 accumulation, and optionally the row maxima of |A|:
// A (m x k, storage type T, rows `lda` apart), B (n x k, fp32, contiguous), C[i, j] at
// c[i * c_row + j * c_col]; maxima[i] = max_j |A[i, j]| (fmaxf: a NaN entry is ignored, it
// makes C's row NaN instead).
//
// It computes Q = W [W_u; β]ᵀ and the row maxima of W for the merge (n = r + 1) in one read
// of W, and [M; g] = U Wᵀ for the low-rank factors (n = 2r + 2; A = W, written transposed
// through c_row = 1, c_col = out).
//
// Tiling (n is small, m and k large: a read of A bound by memory, with n multiply-adds per
// element of A):
// - a block of 256 threads takes kDotRows = 16 rows of A and a column tile of TN >= n
//   columns (TN = 16, 32, 64 or 128, the smallest >= n; tiles of 128 beyond), so A is read
//   from memory once for n <= 128; m / 16 blocks (256 at m = 4096) fill a GPU's SMs;
// - k is walked in chunks of kDotK = 64: the chunk of A is loaded with one 128-bit load per
//   thread where A is 16-byte aligned (unit stride, lda a multiple of the vector), scalar
//   loads otherwise, converted to fp32 into shared memory; the chunk of B (L2-resident,
//   shared by every block) beside it;
// - warp w of the 8 takes the k-values k0 + 8w .. k0 + 8w + 7 of every chunk; lane l
//   computes row l % 16 of the tile for the columns of half l / 16 (TN / 2 of them),
//   reading B four columns at a time;
// - after the last chunk the warps' partial sums are added in shared memory in warp order.
// So C[i, j] = Σ_{w=0..7} s_w (added from zero in that order), s_w = the fmaf chain of warp
// w over its k-values, ascending: deterministic, independent of the launch.
#pragma once

#include <cstring>
#include <string>

#include "common.cuh"

namespace eas::cuda {

constexpr int kDotRows = 16, kDotK = 64, kDotThreads = 256;
constexpr int kDotWarps = kDotThreads / 32, kDotSlice = kDotK / kDotWarps;
constexpr int kDotMaxCols = 128;

// fp32 values of elements [0, kVec) of a 16-byte span at `src`, of which the first `valid`
// exist (zeros past them): one 128-bit load when `vector` (src 16-byte aligned) and the span
// is whole, scalar loads otherwise.
template <class T>
__device__ __forceinline__ void load_span(const T* src, int64_t valid, bool vector,
                                          float (&v)[16 / sizeof(T)]) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector && valid >= kVec) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    T e[kVec];
    memcpy(e, &raw, sizeof raw);  // not a cast of &raw: that would break strict aliasing
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = i < valid ? to_float(src[i]) : 0.0f;
  }
}

template <class T, int TN>
__global__ void __launch_bounds__(kDotThreads)
    dots_kernel(const T* __restrict__ a, int64_t lda, int64_t m, const float* __restrict__ b,
                int64_t n, int64_t k, bool vector, float* __restrict__ c, int64_t c_row,
                int64_t c_col, float* __restrict__ maxima) {
  constexpr int kVec = 16 / sizeof(T);           // elements of A per 128-bit load
  constexpr int kSpans = kDotK / kVec;           // loads per row of a chunk
  constexpr int kLoaders = kDotRows * kSpans;    // threads that load A: 128 (16-bit) or 256
  constexpr int kCols = TN / 2;                  // columns per lane
  constexpr int kAStride = kDotK + 1;            // odd: lanes of different rows, no conflict
  static_assert(kLoaders <= kDotThreads && TN % 8 == 0 && TN <= kDotMaxCols, "dots tiling");
  __shared__ float as[kDotRows * kAStride];
  __shared__ __align__(16) float bs[kDotK * TN];  // bs[kk * TN + j]; then the reduction
  __shared__ unsigned row_max[kDotRows];          // bits of non-negative floats: ordered

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane % kDotRows, first_col = (lane / kDotRows) * kCols;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDotRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  // The span of A this thread loads, the same in every chunk.
  const bool loader = threadIdx.x < kLoaders;
  const int a_row = threadIdx.x / kSpans, a_col = (threadIdx.x % kSpans) * kVec;
  const bool a_in = loader && m0 + a_row < m;
  const T* a_src = a + (a_in ? (m0 + a_row) * lda + a_col : 0);
  float own_max = 0.0f;
  if (threadIdx.x < kDotRows) row_max[threadIdx.x] = 0u;
  __syncthreads();

  float acc[kCols] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kDotK) {
    if (loader) {
      float v[kVec];
      load_span<T>(a_src + k0, a_in ? k - k0 - a_col : 0, vector, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        as[a_row * kAStride + a_col + i] = v[i];
        own_max = fmaxf(own_max, fabsf(v[i]));
      }
    }
    for (int e = threadIdx.x; e < kDotK * TN; e += kDotThreads) {
      const int kk = e / TN, j = e % TN;  // consecutive threads: consecutive shared words
      const int64_t col = k0 + kk;
      bs[e] = (n0 + j < n && col < k) ? __ldg(b + (n0 + j) * k + col) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kDotSlice; ++s) {
      const int kk = warp * kDotSlice + s;
      const float av = as[row * kAStride + kk];
      const float4* bv = reinterpret_cast<const float4*>(bs + kk * TN + first_col);
#pragma unroll
      for (int j = 0; j < kCols / 4; ++j) {
        const float4 q = bv[j];
        acc[4 * j] = fmaf(av, q.x, acc[4 * j]);
        acc[4 * j + 1] = fmaf(av, q.y, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(av, q.z, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(av, q.w, acc[4 * j + 3]);
      }
    }
    __syncthreads();
  }
  if (maxima != nullptr && loader) atomicMax(&row_max[a_row], __float_as_uint(own_max));

  // The warps' partials, added in warp order into bs (free after the last chunk's sync).
  float* sum = bs + row * TN + first_col;
  for (int w = 0; w < kDotWarps; ++w) {
    if (warp == w)
#pragma unroll
      for (int j = 0; j < kCols; ++j) sum[j] = (w == 0 ? 0.0f : sum[j]) + acc[j];
    __syncthreads();
  }
  for (int e = threadIdx.x; e < kDotRows * TN; e += kDotThreads) {
    // consecutive threads along C's unit-stride dimension
    const int i = c_col == 1 ? e / TN : e % kDotRows, j = c_col == 1 ? e % TN : e / kDotRows;
    if (m0 + i < m && n0 + j < n) c[(m0 + i) * c_row + (n0 + j) * c_col] = bs[i * TN + j];
  }
  if (maxima != nullptr && blockIdx.y == 0 && threadIdx.x < kDotRows &&
      m0 + threadIdx.x < m)
    maxima[m0 + threadIdx.x] = __uint_as_float(row_max[threadIdx.x]);
}

// One launch of dots_kernel: its grid, column tile and load width, decided on the host.
struct DotsLaunch {
  dim3 grid;
  int tile;     // TN
  bool vector;  // 128-bit loads of A
};

inline int dots_tile(int64_t n) {
  for (int tile = 16; tile < kDotMaxCols; tile *= 2)
    if (n <= tile) return tile;
  return kDotMaxCols;
}

// The launch of an m x n product over k with A at `a` (rows `lda` elements of `element`
// bytes apart); the grid checked against the device limits (n <= 65535 * 128).
inline DotsLaunch dots_launch(const void* a, int64_t lda, size_t element, int64_t m, int64_t n,
                              const char* op, const std::string& shape) {
  const int tile = dots_tile(n);
  const bool vector = reinterpret_cast<uintptr_t>(a) % 16 == 0 && (lda * element) % 16 == 0;
  return {grid_of(blocks(m, kDotRows), blocks(n, tile), 1, op, "dots_kernel", shape), tile,
          vector};
}

template <class T>
void preload_dots(const char* what) {
  preload(dots_kernel<T, 16>, kDotThreads, what);
  preload(dots_kernel<T, 32>, kDotThreads, what);
  preload(dots_kernel<T, 64>, kDotThreads, what);
  preload(dots_kernel<T, 128>, kDotThreads, what);
}

// `launch` from dots_launch(a, lda, sizeof(T), m, n, ...), checked before the call launches
// anything; `maxima` (m floats) or nullptr.
template <class T>
void launch_dots(const DotsLaunch& launch, const T* a, int64_t lda, int64_t m, const float* b,
                 int64_t n, int64_t k, float* c, int64_t c_row, int64_t c_col, float* maxima,
                 cudaStream_t stream) {
  const auto go = [&](auto kernel) {
    kernel<<<launch.grid, kDotThreads, 0, stream>>>(a, lda, m, b, n, k, launch.vector, c, c_row,
                                                    c_col, maxima);
  };
  switch (launch.tile) {
    case 16:
      return go(dots_kernel<T, 16>);
    case 32:
      return go(dots_kernel<T, 32>);
    case 64:
      return go(dots_kernel<T, 64>);
    default:
      return go(dots_kernel<T, 128>);
  }
}

}  // namespace eas::cuda
