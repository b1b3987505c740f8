#include <stdint.h>

#include "registry.h"

// Defined in csrc/cpu/prune.cpp.
namespace pyfuse {
namespace cpu {
void magnitude_prune(const void* x, void* out, int64_t n, int32_t dtype, int64_t k);
void random_prune(const void* x, void* out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
                  uint32_t purpose);
}  // namespace cpu
}  // namespace pyfuse

PYFUSE_BINDINGS(prune) {
  m.def(
      "magnitude_prune",
      [](uintptr_t x, uintptr_t out, int64_t n, int32_t dtype, int64_t k) {
        pyfuse::cpu::magnitude_prune(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), n, dtype, k);
      },
      PYFUSE_NOGIL, "Keep the k entries of largest |x| (ties: lowest flat index); x may equal out.");
  m.def(
      "random_prune",
      [](uintptr_t x, uintptr_t out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
         uint32_t purpose) {
        pyfuse::cpu::random_prune(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), n, dtype, density,
                                  rescale, seed, purpose);
      },
      PYFUSE_NOGIL, "Keep x[i] iff Philox uniform (seed, i, 0, purpose) < density, optionally / density.");
}
