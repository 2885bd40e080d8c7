// The batched per-example low-rank path (EAS_SPEC §4), CUDA; the math of csrc/cpu/lowrank.h.
//
//   factors: [M; g] = U Wᵀ, U = [W_u^{(0)}; ...; W_u^{(B-1)}; β^{(0)}; ...; β^{(B-1)}]
//            ((B r + B) x d, fp32): dots_kernel writing (n x out) fp32, once per example;
//   add:     y[b, t, c] = round((y[b, t, c] + g_b[c]) + Σ_k proj[b, t, k] M_b[k, c]),
//            k ascending with fmaf: one thread per output column, blocks of 256 columns
//            looping over the (b, t) rows; proj[b, t] is staged in shared memory. Per token r·out
//            multiply-adds and one read and one write of y.
#include "common.cuh"
#include "dots.cuh"
#include "launch.h"

namespace eas::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void add_kernel(T* __restrict__ y, int64_t rows, int64_t tokens, int64_t out,
                           int64_t rank, int64_t y_sb, int64_t y_st, const T* __restrict__ proj,
                           int64_t p_sb, int64_t p_st, int64_t p_sk,
                           const float* __restrict__ factor, const float* __restrict__ offset) {
  extern __shared__ float projected[];  // rank
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t bt = blockIdx.y; bt < rows; bt += gridDim.y) {  // rows = B * tokens
    const int64_t b = bt / tokens, t = bt % tokens;
    const T* p = proj + b * p_sb + t * p_st;
    __syncthreads();  // the previous row's reads of `projected` are done
    for (int64_t k = threadIdx.x; k < rank; k += kThreads) projected[k] = to_float(p[k * p_sk]);
    __syncthreads();
    if (c < out) {
      T* yp = y + b * y_sb + t * y_st + c;
      const float* m = factor + b * rank * out + c;
      float acc = to_float(*yp) + offset[b * out + c];
      for (int64_t k = 0; k < rank; ++k) acc = fmaf(projected[k], m[k * out], acc);
      *yp = from_float<T>(acc);
    }
  }
}

}  // namespace

void lowrank_factors(const FactorArgs& a, int device, void* stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dots<T>(static_cast<const T*>(a.weight), a.ld, a.out, a.up, a.n, a.d, a.dst, 1, a.out,
                   static_cast<cudaStream_t>(stream));
    return 0;
  });
  check(cudaGetLastError(), "lowrank_factors");
}

void lowrank_add(const LowrankAddArgs& a, int device, void* stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  const int64_t rows = a.batch * a.tokens;
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(blocks(a.out, kThreads), static_cast<unsigned>(rows < 65535 ? rows : 65535));
    const size_t shared = sizeof(float) * static_cast<size_t>(a.rank);
    add_kernel<T><<<grid, kThreads, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(a.y), rows, a.tokens, a.out, a.rank, a.y_sb, a.y_st,
        static_cast<const T*>(a.proj), a.p_sb, a.p_st, a.p_sk, a.factor, a.offset);
    return 0;
  });
  check(cudaGetLastError(), "lowrank_add");
}

}  // namespace eas::cuda
