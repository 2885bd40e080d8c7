// Device helpers shared by the CUDA ops: storage types, conversions, error checks.
// CUDA toolkit headers only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace eas::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Half the largest finite value of a storage type: the merge's overflow bound.
template <class T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr double half_max = 0.5 * 3.4028234663852886e38;
};
template <>
struct Limits<__half> {
  static constexpr double half_max = 0.5 * 65504.0;
};
template <>
struct Limits<__nv_bfloat16> {
  static constexpr double half_max = 0.5 * 3.3895313892515355e38;
};

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Makes `device` current for the scope of a host entry point and restores the caller's
// device afterwards: the runtime's current device is the thread's current context, which
// torch shares, so a merge on cuda:1 must not leave torch on cuda:1.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    (void)cudaGetLastError();  // drop a stale (non-sticky) error of an earlier runtime call
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {  // never throws; a failed restore must not poison the next error check
    if (changed_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// ceil(work / per_block) without overflow (work >= 0, per_block > 0).
inline int64_t blocks(int64_t work, int64_t per_block) {
  return work / per_block + (work % per_block != 0);
}

// Grid limits of every CUDA device (compute capability >= 3.0).
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

// The grid of one launch, checked against the device limits before anything of the call is
// launched: a launch that fails after earlier ones wrote would leave half an operation.
// Throws std::invalid_argument naming the op, the kernel and the shape.
inline dim3 grid_of(int64_t x, int64_t y, int64_t z, const char* op, const char* kernel,
                    const std::string& shape) {
  if (x < 1 || x > kMaxGridX || y < 1 || y > kMaxGridYZ || z < 1 || z > kMaxGridYZ)
    throw std::invalid_argument(std::string(op) + ": " + shape + " needs a grid of " +
                                std::to_string(x) + " x " + std::to_string(y) + " x " +
                                std::to_string(z) + " blocks for " + kernel +
                                ", over the device limits (x <= 2^31 - 1, y and z <= 65535, "
                                "each >= 1)");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

// Loads a kernel now (lazy loading, the default since CUDA 12.2, would otherwise load it at
// its first launch, where running out of device memory fails that launch) and checks that
// it runs `threads` threads per block. For the kernels of a call that writes in place: done
// before its first write.
template <class Kernel>
void preload(Kernel* kernel, int threads, const char* name) {
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, kernel), name);
  if (attributes.maxThreadsPerBlock < threads)
    throw std::runtime_error(std::string(name) + ": " + std::to_string(threads) +
                             " threads per block do not fit this device (at most " +
                             std::to_string(attributes.maxThreadsPerBlock) + ")");
}

// Call f with the storage type of a DType code (0 fp32, 1 fp16, 2 bf16; see abi.h).
template <class F>
auto with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(__half{});
    case 2:
      return f(__nv_bfloat16{});
  }
  throw std::invalid_argument("unknown dtype code");
}

}  // namespace eas::cuda
