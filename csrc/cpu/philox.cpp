// pyfuse.rand on the CPU: element i is the Philox uniform of counter (offset + i, stream, purpose 0).
#include "pyfuse/philox.h"

namespace pyfuse {
namespace cpu {

void rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = philox::uniform(seed, offset + static_cast<uint64_t>(i), stream, 0);
  }
}

}  // namespace cpu
}  // namespace pyfuse
