// The CPU kernels in portable C++ for the baseline instruction set of the build target.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "parallel.h"
#include "scalar.h"
#include "simd_portable.h"
#define EAS_ISA Portable
#include "isa_table.inc"

const eas::cpu::KernelTable* eas::cpu::portable_kernels() { return &kTable; }
