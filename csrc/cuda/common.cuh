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

inline unsigned blocks(int64_t work, int64_t per_block) {
  return static_cast<unsigned>((work + per_block - 1) / per_block);
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
