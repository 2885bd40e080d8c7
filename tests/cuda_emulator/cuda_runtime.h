// A CPU emulation of the part of the CUDA runtime and device language that csrc/cuda uses,
// so that the CUDA kernels' own source runs on a machine without a GPU (tests only; built
// by tests/cuda_emulator/build.py, which puts this directory first on the include path so
// that csrc/cuda's `#include <cuda_runtime.h>` finds this file).
//
// Execution model, as CUDA defines it: a launch runs every block of its grid (one after
// another); a block runs its threads as real OS threads, so that `__syncthreads()` is a
// barrier of the block's live threads and warp operations (`__shfl_*_sync`, `__all_sync`)
// are barriers of the warp's 32 lanes; `__shared__` variables are the block's (function
// statics: blocks never overlap); a thread that returns leaves both barriers. Device memory
// is host memory and streams are the host's program order, so a launch has finished when
// it returns. fp16 and bf16 convert by csrc/cpu/scalar.h's exact IEEE conversions.
//
// What it cannot show: timing, the 48 KiB static shared-memory limit (ptxas reports it),
// and the effect of a data race, which real threads may or may not expose.
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>

#include "scalar.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define CUDART_VERSION 13000

using std::isfinite;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// Storage types of their own (so that argument-dependent lookup does not find csrc/cpu's
// overloads), converted exactly by csrc/cpu/scalar.h.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) { return eas::cpu::to_float(eas::cpu::Half{x.bits}); }
inline float __bfloat162float(__nv_bfloat16 x) {
  return eas::cpu::to_float(eas::cpu::BFloat16{x.bits});
}
inline __half __float2half_rn(float x) { return {eas::cpu::from_float<eas::cpu::Half>(x).bits}; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  return {eas::cpu::from_float<eas::cpu::BFloat16>(x).bits};
}

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};

namespace emu {

extern thread_local uint3 thread_index;
extern thread_local uint3 block_index;
extern thread_local dim3 grid_dim;
extern thread_local dim3 block_dim;

cudaError_t& last_error();
void sync_block();
// Every lane's `size` bytes of `value` (at most 8) into lanes[0 .. 32 * size), for every
// lane of the calling thread's warp (a barrier of the warp's live lanes).
void gather(const void* value, std::size_t size, void* lanes);
// Runs `body` once per thread of every block of `grid`; records a launch error instead
// for a configuration CUDA would refuse.
void run_grid(dim3 grid, unsigned threads, const std::function<void()>& body);

struct Config {
  dim3 grid;
  unsigned threads;
  std::size_t shared = 0;
  cudaStream_t stream = nullptr;
};

// `kernel<<<config>>>(args...)`: the arguments converted to the kernel's parameter types
// once, as a launch does, then the grid run.
template <class... P, class... A>
void launch(Config config, void (*kernel)(P...), A&&... args) {
  const std::tuple<P...> parameters(static_cast<P>(args)...);
  run_grid(config.grid, config.threads, [&] { std::apply(kernel, parameters); });
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::sync_block(); }

template <class V>
V __shfl_sync(unsigned, V value, int source, int = 32) {
  V lanes[32];
  emu::gather(&value, sizeof value, lanes);
  return lanes[source % 32];
}

template <class V>
V __shfl_xor_sync(unsigned mask, V value, int offset, int width = 32) {
  return __shfl_sync(mask, value, static_cast<int>(threadIdx.x % 32) ^ offset, width);
}

inline int __all_sync(unsigned, int predicate) {
  int lanes[32];
  emu::gather(&predicate, sizeof predicate, lanes);
  for (int lane : lanes)
    if (lane == 0) return 0;
  return 1;
}

inline unsigned atomicMax(unsigned* address, unsigned value) {
  std::atomic_ref<unsigned> target(*address);
  unsigned old = target.load();
  while (old < value && !target.compare_exchange_weak(old, value)) {
  }
  return old;
}

inline unsigned __float_as_uint(float x) { return eas::cpu::float_bits(x); }
inline float __uint_as_float(unsigned u) { return eas::cpu::bits_float(u); }

template <class V>
V __ldg(const V* address) {
  return *address;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::last_error();
  emu::last_error() = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default:
      return "invalid argument";
  }
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : (emu::last_error() = cudaErrorInvalidDevice);
}
template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  attributes->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* destination, int value, std::size_t bytes,
                                   cudaStream_t = nullptr) {
  std::memset(destination, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* destination, const void* source, std::size_t bytes,
                                   cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memcpy(destination, source, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
