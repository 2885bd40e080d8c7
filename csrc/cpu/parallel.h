// How many OpenMP threads a kernel uses. Included before any `#pragma GCC target`.
#pragma once

#include <cstdint>

namespace eas::cpu {

// Below this many multiply-adds (tens of microseconds on one core) a kernel runs on the
// calling thread: waking the pool would cost more, and its threads would compete with
// torch's for the cores.
constexpr int64_t kSerialWork = int64_t{1} << 20;

inline int threads_for(int requested, int64_t work) { return work < kSerialWork ? 1 : requested; }

}  // namespace eas::cpu
