// The candidates of a sampled key band (select::sample_band), collected during a write or statistics pass
// by prune.cpp and merge.cpp: per fixed chunk, in index order, the key and the offset inside the chunk of
// every element with lo <= key < hi, from which the exact threshold is then selected.
//
// collect_band16 is the AVX-512 step: the compares leave masks, the few band elements (well under 1 % of
// them) are compressed straight into the buffers, and the keys >= hi are counted by popcount. The portable
// alternative is flag bytes and select::for_each_flagged; both give the same candidates in the same order.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include <vector>

namespace pyfuse {
namespace cpu {

struct BandCandidates {
  std::vector<uint32_t> keys;
  std::vector<uint16_t> offs;  // fixed chunks are <= 65536 long
  int64_t count = 0;           // slots in use; the vectors keep 16 spare slots for whole-vector stores

  void reserve(int64_t n) {
    keys.resize(size_t(n) + 16);
    offs.resize(size_t(n) + 16);
  }
  void push(uint32_t key, int64_t offset) {
    if (count + 16 >= int64_t(keys.size())) reserve(int64_t(keys.size()) * 2);
    keys[size_t(count)] = key;
    offs[size_t(count)] = uint16_t(offset);
    ++count;
  }
};

// Every chunk's candidate keys, concatenated: the keys in flat index order, for select::select_in_band.
inline std::vector<uint32_t> keys_in_order(const std::vector<BandCandidates>& chunks) {
  int64_t m = 0;
  for (const BandCandidates& c : chunks) m += c.count;
  std::vector<uint32_t> all;
  all.reserve(size_t(m));
  for (const BandCandidates& c : chunks) all.insert(all.end(), c.keys.begin(), c.keys.begin() + c.count);
  return all;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// 16 keys (< 2^31) at chunk offsets `offset`: appends those in [lo, hi) but the lanes in `skip` to c, returns
// how many are >= hi. Call only from functions compiled for the same target, and only when
// avx512_paths_usable() (cpu/avx512_paths.h).
inline __attribute__((always_inline)) int collect_band16(__m512i key, __m512i offset, __m512i lo, __m512i hi,
                                                         BandCandidates& c, __mmask16 skip = 0) {
  const __mmask16 above = _mm512_cmpge_epu32_mask(key, hi);
  const __mmask16 band = _kandn_mask16(_kor_mask16(above, skip), _mm512_cmpge_epu32_mask(key, lo));
  if (band != 0) {  // most vectors: nothing to store
    if (c.count + 16 >= int64_t(c.keys.size())) c.reserve(int64_t(c.keys.size()) * 2);
    _mm512_storeu_si512(c.keys.data() + c.count, _mm512_maskz_compress_epi32(band, key));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.offs.data() + c.count),
                        _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(band, offset)));
    c.count += __builtin_popcount(band);
  }
  return __builtin_popcount(above);
}

#pragma GCC pop_options

}  // namespace cpu
}  // namespace pyfuse
