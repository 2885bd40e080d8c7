// Host entry points of the CUDA kernels, callable from code compiled without CUDA headers
// (module.cpp): streams travel as void*, devices as ordinals. Each makes the device current
// for the call and restores the caller's (DeviceGuard, common.cuh), checks the grid of every
// launch against the device limits before launching anything (std::invalid_argument), launches
// on the stream only and throws std::runtime_error on a CUDA error.
#pragma once

#include <string>

#include "../abi.h"

namespace eas::cuda {

// See merge.cu. Returns -1, or the index of the first refused target (nothing written).
int merge(const MergeArgs& args, int device, void* stream);
// See lowrank.cu.
void lowrank_factors(const FactorArgs& args, int device, void* stream);
void lowrank_add(const LowrankAddArgs& args, int device, void* stream);

// See device.cu.
int device_count();
std::string device_status();
std::string archs();
int runtime_version();

}  // namespace eas::cuda
