// Philox uniforms for a run of consecutive counters, written over lane arrays so that GCC vectorizes the
// rounds (vpmuludq for the 32x32->64 products) inside whichever target_clones copy inlines it.
// Bit-identical to pyfuse::philox::uniform (csrc/include/pyfuse/philox.h).
#pragma once

#include "pyfuse/philox.h"

namespace pyfuse {
namespace cpu {

constexpr int64_t kPhiloxLanes = 64;

// u[l] = uniform of counter (first + l, stream, purpose) for l < kPhiloxLanes.
__attribute__((always_inline)) inline void philox_uniform_lanes(uint64_t seed, uint64_t first, uint32_t stream,
                                                                uint32_t purpose, float* u) {
  uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int64_t l = 0; l < kPhiloxLanes; ++l) {
    const uint64_t index = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(index);
    c1[l] = static_cast<uint32_t>(index >> 32);
    c2[l] = stream;
    c3[l] = purpose;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int64_t l = 0; l < kPhiloxLanes; ++l) {
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
  for (int64_t l = 0; l < kPhiloxLanes; ++l) u[l] = philox::uint_to_uniform(c0[l]);
}

}  // namespace cpu
}  // namespace pyfuse
