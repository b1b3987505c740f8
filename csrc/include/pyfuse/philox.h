// Philox4x32-10, bit-identical to Triton's tl.randint4x / tl.rand (see docs/developing.md and
// the Philox notes): key = seed as uint64 split (lo, hi); counter = (c0, c1, c2, c3).
// pyfuse's convention: c0/c1 = element index lo/hi, c2 = stream, c3 = purpose. Two layouts of a stream:
// `uniform` (tl.rand: element i takes word 0 of counter i) and `packed_uniform` (tl.rand4x: element i takes
// word i % 4 of counter i / 4, a quarter of the rounds; the merge masks use it).
#pragma once

#include "pyfuse/common.h"

namespace pyfuse {
namespace philox {

struct U32x4 {
  uint32_t v[4];
};

PYFUSE_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

PYFUSE_HD U32x4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                           int rounds = 10) {
  const uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  const uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int r = 0; r < rounds; ++r) {
    const uint32_t n0 = mulhi(kRoundB, c2) ^ c1 ^ k0;
    const uint32_t n1 = kRoundB * c2;
    const uint32_t n2 = mulhi(kRoundA, c0) ^ c3 ^ k1;
    const uint32_t n3 = kRoundA * c0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  U32x4 out = {{c0, c1, c2, c3}};
  return out;
}

PYFUSE_HD U32x4 randint4x(uint64_t seed, uint64_t index, uint32_t stream, uint32_t purpose) {
  return philox4x32(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), stream, purpose,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// tl.rand's conversion: bitcast to int32, fold negatives with ~x, multiply by 0x1.fffffep-32.
// Result in [0, 1 - 2^-24]. The multiply is exact-rounded everywhere (no FMA partner).
PYFUSE_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  if (s < 0) s = ~s;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__int2float_rn(s), 0x1.fffffep-32f);
#else
  return static_cast<float>(s) * 0x1.fffffep-32f;
#endif
}

PYFUSE_HD float uniform(uint64_t seed, uint64_t index, uint32_t stream, uint32_t purpose) {
  return uint_to_uniform(randint4x(seed, index, stream, purpose).v[0]);
}

PYFUSE_HD float packed_uniform(uint64_t seed, uint64_t index, uint32_t stream, uint32_t purpose) {
  const U32x4 w = randint4x(seed, index >> 2, stream, purpose);
  // Two levels of selects, not w.v[index & 3]: a dynamic index puts w in CUDA local memory.
  const bool odd = (index & 1) != 0;
  const uint32_t low = odd ? w.v[1] : w.v[0], high = odd ? w.v[3] : w.v[2];
  return uint_to_uniform((index & 2) != 0 ? high : low);
}

}  // namespace philox
}  // namespace pyfuse
