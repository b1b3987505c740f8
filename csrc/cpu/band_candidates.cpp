// The switch between the AVX-512 and portable band paths (band_candidates.h), shared by prune and merge.
#include "cpu/band_candidates.h"

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

bool band_avx512_usable() { return avx512_enabled.load(std::memory_order_relaxed) && cpu_has_avx512(); }

bool set_band_avx512(bool enabled) { return avx512_enabled.exchange(enabled); }

}  // namespace cpu
}  // namespace pyfuse
