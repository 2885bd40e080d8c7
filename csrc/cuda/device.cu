// What the CUDA module was built for and which devices its (static) runtime sees.
#include <string>

#include "common.cuh"
#include "launch.h"

#ifndef EAS_CUDA_ARCHS
#error "setup.py passes -DEAS_CUDA_ARCHS=\"80;90\" (the compute capabilities built)"
#endif

namespace eas::cuda {

// A failed cudaGetDeviceCount also sets the runtime's last error: cleared here, so that a
// later launch check (cudaGetLastError) does not report it as its own.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess) return count;
  (void)cudaGetLastError();
  return 0;
}

std::string device_status() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("unavailable: ") + cudaGetErrorString(status);
  }
  return std::to_string(count) + " device(s)";
}

std::string archs() { return EAS_CUDA_ARCHS; }

int runtime_version() { return CUDART_VERSION; }

}  // namespace eas::cuda
