// The write pass of magnitude_prune's sampled band (prune.cpp), one fixed chunk at a time: keep every
// element whose key (|x| bit pattern) is >= lo, zero the others, and collect the elements whose key is in
// [lo, hi) as candidates for the exact threshold. Two paths with identical results: AVX-512 (compares into
// mask registers, candidates appended with vpcompressd) and a portable one (auto-vectorised flag bytes,
// then a scan of the flags 64 at a time).
#pragma once

#include <stdint.h>

#include <vector>

namespace pyfuse {
namespace cpu {

// One chunk's candidates in index order: key and offset inside the chunk (chunks are <= 65536 long).
struct BandCandidates {
  std::vector<uint32_t> keys;
  std::vector<uint16_t> offs;
  int64_t count = 0;  // slots in use; the vectors keep slack for whole-vector stores

  void reserve(int64_t n);
  void grow();  // doubles the slots, keeping the first `count`
};

// Whether the AVX-512 path can run on this CPU (F, BW, VL, DQ).
bool band_avx512_usable();

// out[i] = key(x[i]) >= lo ? x[i] : 0 for i < len; appends to c the candidates lo <= key < hi; returns how
// many keys are >= hi. Bits is uint32_t (float32, key = bits & 0x7fffffff) or uint16_t (16-bit floats,
// key = bits & 0x7fff). The AVX-512 path requires band_avx512_usable().
template <class Bits>
int64_t keep_and_collect_avx512(const Bits* x, Bits* out, int64_t len, uint32_t lo, uint32_t hi, BandCandidates& c);
template <class Bits>
int64_t keep_and_collect_portable(const Bits* x, Bits* out, int64_t len, uint32_t lo, uint32_t hi, BandCandidates& c);

}  // namespace cpu
}  // namespace pyfuse
