// pyfuse.rand on the CPU: element i is the Philox uniform of counter (offset + i, stream, purpose 0).
#include "cpu/philox.h"

#include "pyfuse/philox.h"

namespace pyfuse {
namespace cpu {
namespace {

constexpr int64_t kLanes = 64;  // elements generated together; the round loop vectorizes across them

// Philox rounds written over lane arrays so that GCC vectorizes them (vpmuludq for the 32x32->64 products).
__attribute__((target_clones("avx512f", "avx2", "default"))) void rand_block(float* out, int64_t count,
                                                                            uint64_t seed, uint64_t first,
                                                                            uint32_t stream) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t index = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(index);
    c1[l] = static_cast<uint32_t>(index >> 32);
    c2[l] = stream;
    c3[l] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0[l];
      c0[l] = static_cast<uint32_t>(pb >> 32) ^ c1[l] ^ k0;
      c1[l] = static_cast<uint32_t>(pb);
      c2[l] = static_cast<uint32_t>(pa >> 32) ^ c3[l] ^ k1;
      c3[l] = static_cast<uint32_t>(pa);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int64_t l = 0; l < count; ++l) out[l] = philox::uint_to_uniform(c0[l]);
}

}  // namespace

void rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream) {
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  // Threads only pay off past a few blocks; the result never depends on the thread count.
#pragma omp parallel for schedule(static) if (blocks > 256)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kLanes;
    const int64_t count = n - start < kLanes ? n - start : kLanes;
    rand_block(out + start, count, seed, offset + static_cast<uint64_t>(start), stream);
  }
}

}  // namespace cpu
}  // namespace pyfuse
