// The CPU kernels of one instruction set, as a table of plain functions (see isa_*.cpp).
#pragma once

#include "../abi.h"

namespace eas::cpu {

struct KernelTable {
  const char* name;  // "avx512", "avx2", "portable"
  int (*merge[3])(const MergeArgs&);                  // indexed by DType
  void (*lowrank_factors[3])(const FactorArgs&);
  void (*lowrank_add[3])(const LowrankAddArgs&);
};

// Each returns nullptr when the running CPU lacks the instruction set (or the build
// target is not x86-64, for the first two).
const KernelTable* avx512_kernels();
const KernelTable* avx2_kernels();
const KernelTable* portable_kernels();

}  // namespace eas::cpu
