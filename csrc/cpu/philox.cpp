// pyfuse.rand on the CPU: element i is the Philox uniform of counter (offset + i, stream, purpose 0).
#include "cpu/philox.h"

#include "cpu/philox_lanes.h"

namespace pyfuse {
namespace cpu {
namespace {

__attribute__((target_clones("avx512f", "avx2", "default"))) void rand_block(float* out, int64_t count,
                                                                            uint64_t seed, uint64_t first,
                                                                            uint32_t stream) {
  alignas(64) float u[kPhiloxLanes];
  philox_uniform_lanes(seed, first, stream, 0, u);
  for (int64_t l = 0; l < count; ++l) out[l] = u[l];
}

}  // namespace

void rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream) {
  const int64_t blocks = (n + kPhiloxLanes - 1) / kPhiloxLanes;
  // Threads only pay off past a few blocks; the result never depends on the thread count.
#pragma omp parallel for schedule(static) if (blocks > 256)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kPhiloxLanes;
    const int64_t count = n - start < kPhiloxLanes ? n - start : kPhiloxLanes;
    rand_block(out + start, count, seed, offset + static_cast<uint64_t>(start), stream);
  }
}

}  // namespace cpu
}  // namespace pyfuse
