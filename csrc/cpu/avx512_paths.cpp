// The switch between the hand-written AVX-512 paths and the portable ones (avx512_paths.h).
#include "cpu/avx512_paths.h"

#include <atomic>

namespace pyfuse {
namespace cpu {
namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

std::atomic<bool> avx512_enabled{true};

}  // namespace

bool avx512_paths_usable() { return avx512_enabled.load(std::memory_order_relaxed) && cpu_has_avx512(); }

bool set_avx512_paths(bool enabled) { return avx512_enabled.exchange(enabled); }

}  // namespace cpu
}  // namespace pyfuse
