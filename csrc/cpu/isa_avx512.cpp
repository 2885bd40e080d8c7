// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA and F16C.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "parallel.h"
#include "scalar.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 reports the _mm512_undefined_ps() inside its own intrinsics as uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "simd_avx512.h"
#define EAS_ISA Avx512
#include "isa_table.inc"

const eas::cpu::KernelTable* eas::cpu::avx512_kernels() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &kTable : nullptr;
}
#else
const eas::cpu::KernelTable* eas::cpu::avx512_kernels() { return nullptr; }
#endif
