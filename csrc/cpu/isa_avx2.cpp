// The CPU kernels compiled for AVX2 with FMA and F16C.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "parallel.h"
#include "scalar.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include "simd_avx2.h"
#define EAS_ISA Avx2
#include "isa_table.inc"

const eas::cpu::KernelTable* eas::cpu::avx2_kernels() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("f16c");
  return ok ? &kTable : nullptr;
}
#else
const eas::cpu::KernelTable* eas::cpu::avx2_kernels() { return nullptr; }
#endif
