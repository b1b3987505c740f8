// pyfuse.magnitude_prune and pyfuse.random_prune on the CPU (OpenMP).
//
// magnitude_prune: two passes in the common case. Pass 1 is the first-level histogram of
// select.h; the write pass keeps every element at or above the boundary bucket and collects the
// bucket's elements (as 16-bit offsets inside their fixed chunk); a serial fix-up then finds the exact
// threshold among those few candidates and zeroes the ones below it, ties beyond k last. When the
// boundary bucket is large (heavy ties) the exact threshold comes first (select_threshold) and the
// write pass applies it directly. x may alias out (the op copies non-contiguous inputs into out).
#include <string.h>

#include <vector>

#include "cpu/select.h"
#include "pyfuse/common.h"
#include "pyfuse/philox.h"

// Runtime dispatch: one build, widest vectors the CPU has (never -march=native).
#define PYFUSE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define PYFUSE_INLINE __attribute__((always_inline)) inline

namespace pyfuse {
namespace cpu {
namespace {

using select::kChunk;

// out[i] = x[i] where key >= lo, else +0, as an integer bit-mask select so that it vectorizes.
// With band != nullptr also flags band[i] = (lo <= key < hi) (the boundary bucket) and returns how
// many were flagged.
template <class Bits, bool kBand>
PYFUSE_INLINE int64_t keep_from_body(const Bits* x, Bits* out, uint8_t* band, int64_t len, uint32_t lo, uint32_t hi) {
  constexpr uint32_t kAbs = sizeof(Bits) == 4 ? 0x7fffffffu : 0x7fffu;
  int64_t in_band = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t key = uint32_t(x[i]) & kAbs;
    const Bits keep = Bits(0) - Bits(key >= lo);
    out[i] = x[i] & keep;
    if (kBand) {
      const uint8_t f = uint8_t((key >= lo) & (key < hi));
      band[i] = f;
      in_band += f;
    }
  }
  return in_band;
}

PYFUSE_CLONES int64_t keep_from(const uint32_t* x, uint32_t* out, uint8_t* band, int64_t len, uint32_t lo,
                                uint32_t hi) {
  return band ? keep_from_body<uint32_t, true>(x, out, band, len, lo, hi)
              : keep_from_body<uint32_t, false>(x, out, band, len, lo, hi);
}
PYFUSE_CLONES int64_t keep_from(const uint16_t* x, uint16_t* out, uint8_t* band, int64_t len, uint32_t lo,
                                uint32_t hi) {
  return band ? keep_from_body<uint16_t, true>(x, out, band, len, lo, hi)
              : keep_from_body<uint16_t, false>(x, out, band, len, lo, hi);
}

// Candidate offsets inside one fixed chunk fit 16 bits.
static_assert(kChunk <= 65536, "chunk offsets are stored as uint16");

template <class Bits, int kKeyBits>
struct MagnitudePrune {
  static constexpr uint32_t kAbs = (uint32_t(1) << kKeyBits) - 1u;
  static constexpr int64_t kBlock = 4096;  // write-pass block: rescanned from L1 when it holds candidates

  const Bits* x;
  Bits* out;
  int64_t n, k;

  uint32_t key(int64_t i) const { return uint32_t(x[i]) & kAbs; }

  void run() const {
    if (k <= 0) return fill_zero();
    if (k >= n) {
      if (x != out) memcpy(out, x, size_t(n) * sizeof(Bits));
      return;
    }
    auto key_of = [this](int64_t i) { return key(i); };
    const select::Bucket b = select::find_bucket<kKeyBits>(n, k, key_of);
    // Candidates cost 2 bytes each (x3 for vector growth): stay under 1/10 of the input's bytes.
    if (b.count * 6 <= n * int64_t(sizeof(Bits)) / 10) {
      write_with_candidates(b);
    } else {
      write_exact(select::refine<kKeyBits>(b, n, k, key_of));
    }
  }

  void fill_zero() const {
    const int64_t chunks = select::num_chunks(n);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      memset(out + begin, 0, size_t(end - begin) * sizeof(Bits));
    }
  }

  // Keeps the whole boundary bucket, records its members, then trims it to exactly k.
  void write_with_candidates(const select::Bucket& b) const {
    const uint32_t lo = b.bin << b.shift, hi = (b.bin + 1u) << b.shift;
    const int64_t chunks = select::num_chunks(n);
    std::vector<std::vector<uint16_t>> cand(chunks);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t cbegin = c * kChunk, cend = std::min(n, cbegin + kChunk);
      alignas(8) uint8_t band[kBlock];
      for (int64_t begin = cbegin; begin < cend; begin += kBlock) {
        const int64_t len = std::min(kBlock, cend - begin);
        if (keep_from(x + begin, out + begin, band, len, lo, hi) == 0) continue;
        // Skip unflagged elements 8 at a time; flags are 0/1 bytes, so bit 8j marks element j.
        for (int64_t w = 0; w < len; w += 8) {
          uint64_t bits = 0;
          memcpy(&bits, band + w, size_t(std::min<int64_t>(8, len - w)));
          for (; bits; bits &= bits - 1)
            cand[c].push_back(uint16_t(begin - cbegin + w + (__builtin_ctzll(bits) >> 3)));
        }
      }
    }
    std::vector<int64_t> low_hist;
    if (b.shift > 0) {
      low_hist.assign(int64_t(1) << b.shift, 0);
      for (int64_t c = 0; c < chunks; ++c)
        for (uint16_t off : cand[c]) ++low_hist[key(c * kChunk + off) & (hi - lo - 1u)];
    }
    const select::Threshold t = select::threshold_in_bucket(b, low_hist, k);
    int64_t equal_seen = 0;  // chunks and offsets ascend: lowest flat index first
    for (int64_t c = 0; c < chunks; ++c) {
      for (uint16_t off : cand[c]) {
        const int64_t i = c * kChunk + off;
        const uint32_t kk = key(i);
        if (kk < t.key || (kk == t.key && equal_seen++ >= t.equal_kept)) out[i] = 0;
      }
    }
  }

  // Applies a complete threshold; only the one chunk where the tie quota runs out goes element-wise.
  void write_exact(const select::Threshold& t) const {
    const int64_t chunks = select::num_chunks(n);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk, len = std::min(n, begin + kChunk) - begin;
      const int64_t quota = t.quota(c);
      const int64_t equal_here =
          t.split() ? (c + 1 < chunks ? t.equal_before[c + 1] : t.equal_total) - t.equal_before[c] : 0;
      if (quota >= equal_here || quota == 0) {
        const uint32_t lo = quota == 0 ? t.key + 1u : t.key;
        keep_from(x + begin, out + begin, nullptr, len, lo, lo);
        continue;
      }
      int64_t seen = 0;
      for (int64_t i = begin; i < begin + len; ++i) {
        const uint32_t kk = key(i);
        const bool keep = kk > t.key || (kk == t.key && seen++ < quota);
        out[i] = keep ? x[i] : Bits(0);
      }
    }
  }
};

// u_i < d keeps element i; d is the float32 density (0 keeps nothing, 1 everything: u <= 1 - 2^-24).
template <int32_t kDtype>
PYFUSE_INLINE void random_prune_body(const void* x, void* out, int64_t begin, int64_t end, float d, bool rescale,
                                     uint64_t seed, uint32_t purpose) {
  for (int64_t i = begin; i < end; ++i) {
    const float u = philox::uniform(seed, uint64_t(i), 0u, purpose);
    const float v = load_float(x, kDtype, i);
    const float r = rescale ? v / d : v;
    store_float(out, kDtype, i, u < d ? r : 0.0f);
  }
}

PYFUSE_CLONES void random_prune_f32(const void* x, void* out, int64_t b, int64_t e, float d, bool rs, uint64_t s,
                                    uint32_t p) {
  random_prune_body<kFloat32>(x, out, b, e, d, rs, s, p);
}
PYFUSE_CLONES void random_prune_f16(const void* x, void* out, int64_t b, int64_t e, float d, bool rs, uint64_t s,
                                    uint32_t p) {
  random_prune_body<kFloat16>(x, out, b, e, d, rs, s, p);
}
PYFUSE_CLONES void random_prune_bf16(const void* x, void* out, int64_t b, int64_t e, float d, bool rs, uint64_t s,
                                     uint32_t p) {
  random_prune_body<kBFloat16>(x, out, b, e, d, rs, s, p);
}

}  // namespace

// Keeps the k entries of largest |x| (ties: lowest flat index), zeroes the rest. x may equal out.
void magnitude_prune(const void* x, void* out, int64_t n, int32_t dtype, int64_t k) {
  if (dtype == kFloat32) {
    MagnitudePrune<uint32_t, 31>{static_cast<const uint32_t*>(x), static_cast<uint32_t*>(out), n, k}.run();
  } else {
    MagnitudePrune<uint16_t, 15>{static_cast<const uint16_t*>(x), static_cast<uint16_t*>(out), n, k}.run();
  }
}

// out[i] = (u_i < density) ? x[i] (/ density if rescale) : 0, u_i = Philox uniform (seed, i, 0, purpose).
void random_prune(const void* x, void* out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
                  uint32_t purpose) {
  auto body = dtype == kFloat32 ? random_prune_f32 : dtype == kFloat16 ? random_prune_f16 : random_prune_bf16;
  const int64_t chunks = select::num_chunks(n);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    body(x, out, c * kChunk, std::min(n, (c + 1) * kChunk), density, rescale, seed, purpose);
  }
}

}  // namespace cpu
}  // namespace pyfuse
