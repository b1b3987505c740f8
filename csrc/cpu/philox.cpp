// pyfuse.rand on the CPU: element i is the Philox uniform of counter (offset + i, stream, purpose 0).
#include "cpu/philox.h"

#include "cpu/philox_lanes.h"

namespace pyfuse {
namespace cpu {

bool rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream, PhiloxIsa isa,
                  PhiloxLayout layout) {
  if (!philox_isa_usable(isa)) return false;
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // Threads only pay off past a few blocks; the result never depends on the thread count.
#pragma omp parallel for schedule(static) if (blocks > 4)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t count = n - start < kBlock ? n - start : kBlock;
    philox_uniforms_isa(isa, seed, offset + static_cast<uint64_t>(start), stream, 0, out + start, count, layout);
  }
  return true;
}

}  // namespace cpu
}  // namespace pyfuse
