// pyfuse.magnitude_prune and pyfuse.random_prune on the CPU (OpenMP).
//
// magnitude_prune reads x once in the common case. A 1/64 sample gives a narrow key band that holds
// the k-th largest key with high probability; the write pass keeps every element at or above the band
// and collects the band's elements (as 16-bit offsets inside their fixed chunk); the exact threshold is
// then selected among those few candidates (select.h) and the ones below it are zeroed, ties beyond k
// last. Exact whatever the sample says: when the band misses, or for small or in-place inputs, the band
// is the boundary bucket of a full first-level histogram (select.h, one more read), and with heavy
// ties (too many candidates) the exact threshold comes first and the write pass applies it directly.
// x may alias out (the op copies non-contiguous inputs into out, then prunes in place).
#include <math.h>
#include <string.h>

#include <type_traits>
#include <vector>

#include "cpu/avx512_paths.h"
#include "cpu/clones.h"
#include "cpu/philox_lanes.h"
#include "cpu/prune_band.h"
#include "cpu/select.h"
#include "pyfuse/common.h"

namespace pyfuse {
namespace cpu {
namespace {

using select::kChunk;

// out[i] = x[i] where key >= lo, else +0, as an integer bit-mask select so that it vectorizes.
template <class Bits>
PYFUSE_INLINE void keep_from_body(const Bits* x, Bits* out, int64_t len, uint32_t lo) {
  for (int64_t i = 0; i < len; ++i) out[i] = x[i] & (Bits(0) - Bits((uint32_t(x[i]) & abs_mask<Bits>()) >= lo));
}

PYFUSE_CLONES void keep_from(const uint32_t* x, uint32_t* out, int64_t len, uint32_t lo) {
  keep_from_body(x, out, len, lo);
}
PYFUSE_CLONES void keep_from(const uint16_t* x, uint16_t* out, int64_t len, uint32_t lo) {
  keep_from_body(x, out, len, lo);
}

// Candidate offsets inside one fixed chunk fit 16 bits.
static_assert(kChunk <= 65536, "chunk offsets are stored as uint16");

template <class Bits, int kKeyBits>
struct MagnitudePrune {
  static constexpr uint32_t kAbs = (uint32_t(1) << kKeyBits) - 1u;
  static constexpr int64_t kSampleMin = 1 << 18;  // below this a full histogram pass is cheap anyway

  const Bits* x;
  Bits* out;
  int64_t n, k;
  bool avx512;  // the write pass's band collection may use AVX-512 (prune_band.h)

  uint32_t key(int64_t i) const { return uint32_t(x[i]) & kAbs; }

  // A candidate costs 2 + 4 bytes in its chunk's buffers and 4 in the final selection (x2 for
  // reserve slack): keep them under 1/10 of the input's bytes.
  bool candidates_fit(int64_t count) const { return count * 20 <= n * int64_t(sizeof(Bits)) / 10; }

  // Buffer size per chunk for `count` expected candidates overall, with a margin.
  int64_t per_chunk(int64_t count) const { return count / select::num_chunks(n) * 5 / 4 + 16; }

  void run() const {
    if (k <= 0) return fill_zero();
    if (k >= n) {
      if (x != out) memcpy(out, x, size_t(n) * sizeof(Bits));
      return;
    }
    // A sampled band can miss; a retry rewrites out from x, so only when x is not out.
    auto key_of = [this](int64_t i) { return key(i); };
    if (x != out && n >= kSampleMin) {  // select::sample_band reads 1/64 of the keys; skipped when ties crowd it
      const select::Band band = select::sample_band<kKeyBits>(n, k, key_of);
      if (candidates_fit(band.expected) && write_band(band.lo, band.hi, per_chunk(band.expected))) return;
    }
    const select::Bucket b = select::find_bucket<kKeyBits>(n, k, key_of);
    if (candidates_fit(b.count)) {
      write_band(b.bin << b.shift, (b.bin + 1u) << b.shift, per_chunk(b.count));  // holds the threshold
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

  // Keeps every key >= lo and records the elements of [lo, hi) (offset in their fixed chunk, and
  // key); if that band holds the k-th largest key, finds it exactly among the candidates and zeroes
  // the ones below it, ties beyond k last. Returns false (out unfinished) when the band misses it.
  // `expected` (candidates per chunk) only sizes the buffers.
  bool write_band(uint32_t lo, uint32_t hi, int64_t expected) const {
    const int64_t chunks = select::num_chunks(n);
    std::vector<BandCandidates> cand(chunks);
    std::vector<int64_t> above_chunk(chunks, 0);
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk, len = std::min(n, begin + kChunk) - begin;
      cand[c].reserve(expected);
      above_chunk[c] = avx512 ? keep_and_collect_avx512(x + begin, out + begin, len, lo, hi, cand[c])
                              : keep_and_collect_portable(x + begin, out + begin, len, lo, hi, cand[c]);
    }
    int64_t above = 0, m = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      above += above_chunk[c];
      m += cand[c].count;
    }
    if (above >= k || above + m < k) return false;
    const std::vector<uint32_t> all = keys_in_order(cand);
    const select::Threshold t = select::select_in_band(m, k - above, lo, hi, [&all](int64_t j) { return all[j]; });
    // Zero the candidates below the threshold and the ties beyond k, chunks in parallel: each of these writes
    // misses the cache (the out lines are long evicted), so one thread would wait on every one in turn.
    std::vector<int64_t> equal_before(chunks, 0);  // ties at t.key in earlier chunks' candidates
    for (int64_t c = 0, seen = 0; c < chunks && t.equal_kept < t.equal_total; ++c) {
      equal_before[c] = seen;
      for (int64_t j = 0; j < cand[c].count; ++j) seen += cand[c].keys[size_t(j)] == t.key;
    }
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t equal_seen = equal_before[c];
      for (int64_t j = 0; j < cand[c].count; ++j) {
        const uint32_t kk = cand[c].keys[size_t(j)];
        if (kk < t.key || (kk == t.key && equal_seen++ >= t.equal_kept)) out[c * kChunk + cand[c].offs[size_t(j)]] = 0;
      }
    }
    return true;
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
        keep_from(x + begin, out + begin, len, lo);
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
// Uniforms for a block first (vector Philox), then an integer bit-mask select so that the float32 loops
// vectorize; without rescale, kept values are copied bit for bit.
constexpr int64_t kRandomBlock = 1024;

template <int32_t kDtype>
PYFUSE_INLINE void random_prune_block(const void* x, void* out, int64_t begin, int64_t len, float d, bool rescale,
                                      uint64_t seed, uint32_t purpose) {
  using Bits = std::conditional_t<kDtype == kFloat32, uint32_t, uint16_t>;
  alignas(64) float u[kRandomBlock];
  philox_uniforms(seed, uint64_t(begin), 0u, purpose, u, len);
  const Bits* xb = static_cast<const Bits*>(x) + begin;
  Bits* ob = static_cast<Bits*>(out) + begin;
  if (!rescale) {
    for (int64_t j = 0; j < len; ++j) ob[j] = xb[j] & (Bits(0) - Bits(u[j] < d));
    return;
  }
  // x / d where kept, else +0, in float32, then rounded to the dtype (the conversions in common.h are
  // branch-free, so the 16-bit loops vectorize too: bf16 2.3x faster than one scalar loop).
  alignas(64) float v[kRandomBlock];
  for (int64_t j = 0; j < len; ++j) {
    const float q = load_float(x, kDtype, begin + j) / d;
    v[j] = bits_float(float_bits(q) & (0u - uint32_t(u[j] < d)));
  }
  for (int64_t j = 0; j < len; ++j) store_float(out, kDtype, begin + j, v[j]);
}

PYFUSE_CLONES void random_prune_f32(const void* x, void* out, int64_t begin, int64_t len, float d, bool rescale,
                                    uint64_t seed, uint32_t purpose) {
  random_prune_block<kFloat32>(x, out, begin, len, d, rescale, seed, purpose);
}
PYFUSE_CLONES void random_prune_f16(const void* x, void* out, int64_t begin, int64_t len, float d, bool rescale,
                                    uint64_t seed, uint32_t purpose) {
  random_prune_block<kFloat16>(x, out, begin, len, d, rescale, seed, purpose);
}
PYFUSE_CLONES void random_prune_bf16(const void* x, void* out, int64_t begin, int64_t len, float d, bool rescale,
                                     uint64_t seed, uint32_t purpose) {
  random_prune_block<kBFloat16>(x, out, begin, len, d, rescale, seed, purpose);
}

}  // namespace

// Keeps the k entries of largest |x| (ties: lowest flat index), zeroes the rest. x may equal out.
void magnitude_prune(const void* x, void* out, int64_t n, int32_t dtype, int64_t k) {
  const bool avx512 = avx512_paths_usable();
  if (dtype == kFloat32) {
    MagnitudePrune<uint32_t, 31>{static_cast<const uint32_t*>(x), static_cast<uint32_t*>(out), n, k, avx512}.run();
  } else {
    MagnitudePrune<uint16_t, 15>{static_cast<const uint16_t*>(x), static_cast<uint16_t*>(out), n, k, avx512}.run();
  }
}

// out[i] = (u_i < density) ? x[i] (/ density if rescale) : 0, u_i = Philox uniform (seed, i, 0, purpose).
void random_prune(const void* x, void* out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
                  uint32_t purpose) {
  const int64_t blocks = (n + kRandomBlock - 1) / kRandomBlock;
#pragma omp parallel for schedule(static) if (blocks > 64)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kRandomBlock, len = std::min(kRandomBlock, n - begin);
    (dtype == kFloat32 ? random_prune_f32 : dtype == kFloat16 ? random_prune_f16 : random_prune_bf16)(
        x, out, begin, len, density, rescale, seed, purpose);
  }
}

}  // namespace cpu
}  // namespace pyfuse
