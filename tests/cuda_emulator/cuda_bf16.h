#pragma once
#include "cuda_runtime.h"  // the emulated __nv_bfloat16
