// The write pass of magnitude_prune's sampled band (prune.cpp), one fixed chunk at a time: keep every
// element whose key (|x| bit pattern) is >= lo, zero the others, and collect the elements whose key is in
// [lo, hi) (band_candidates.h). Two paths with identical results: AVX-512 and portable (auto-vectorised
// flag bytes, then a scan of the flags 64 at a time).
#pragma once

#include <stdint.h>

#include "cpu/band_candidates.h"

namespace pyfuse {
namespace cpu {

// The key of a float's bit pattern: |x| (the sign bit cleared), for uint32_t (float32) or uint16_t (16-bit).
template <class Bits>
constexpr uint32_t abs_mask() {
  return sizeof(Bits) == 4 ? 0x7fffffffu : 0x7fffu;
}

// out[i] = key(x[i]) >= lo ? x[i] : 0 for i < len; appends to c the candidates lo <= key < hi; returns how
// many keys are >= hi. Bits is uint32_t (float32, key = bits & 0x7fffffff) or uint16_t (16-bit floats,
// key = bits & 0x7fff). The AVX-512 path requires avx512_paths_usable().
template <class Bits>
int64_t keep_and_collect_avx512(const Bits* x, Bits* out, int64_t len, uint32_t lo, uint32_t hi, BandCandidates& c);
template <class Bits>
int64_t keep_and_collect_portable(const Bits* x, Bits* out, int64_t len, uint32_t lo, uint32_t hi, BandCandidates& c);

}  // namespace cpu
}  // namespace pyfuse
