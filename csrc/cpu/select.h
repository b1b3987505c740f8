// Exact top-k threshold selection over integer keys, without sorting (CPU, OpenMP). Header-only.
//
// API (stable: prune.cpp and the merge kernels use it)
// -------------------------------------------------------------------------------------------------
// Keys. A functor `key_of(int64_t i) -> uint32_t` gives the key of flat element i in [0, n); keys
//   must be < 2^kKeyBits (kKeyBits <= 31). A larger key means a larger magnitude. For |x|:
//     float32 (or any value computed in fp32):  float_bits(x) & 0x7fffffff   -> kKeyBits = 31
//     float16 / bfloat16 (raw 16-bit pattern):  bits & 0x7fff               -> kKeyBits = 15
//   NaN keys are above +inf, so NaN counts as the largest magnitude.
//   The functor is called once per element per pass, so it can compute keys on the fly
//   (e.g. |model_i - base| for a merge) without materialising them.
//
// Rule. Keep exactly k elements: those of largest key; among elements whose key equals the k-th
//   largest key, the lowest flat indices win.
//
// Threshold t = select_threshold<kKeyBits>(n, k, key_of);   // 0 <= k <= n
//   Element i, in fixed chunk c = i / kChunk, is kept iff
//       key > t.key   ||   (key == t.key  &&  e < t.quota(c))
//   where e = number of elements of chunk c before i whose key == t.key. t.split() is false in the
//   common case (all ties at the threshold kept, e.g. tie-free data): then the test is key >= t.key,
//   except for k == 0 where t.key = 0xffffffff matches no key. Chunk boundaries never depend on the
//   thread count, so any fused pass that walks chunk c in order decides every element exactly.
//
// Passes over the keys: 1 (16-bit-key histogram) + 1 (second level on the boundary bucket, only when
// kKeyBits > 16) + 1 (per-chunk count of keys equal to the threshold, only when t.split()).
// Memory: one histogram per thread (at most 2^16 uint32) and one int64 per chunk when split.
// The lower-level pieces (histogram, top_bin, find_bucket, threshold_in_bucket, refine, equal_before,
// sample_band, heavy_keys, select_in_band) let an op fuse its own passes (see prune.cpp and merge.cpp).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

namespace pyfuse {
namespace select {

// Fixed chunk length (elements): the unit of work and of tie bookkeeping.
constexpr int64_t kChunk = int64_t(1) << 16;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

struct Threshold {
  uint32_t key = 0;         // keys above are kept; keys equal are kept up to the quota
  int64_t equal_kept = 0;   // how many elements with key == this->key are kept in total
  int64_t equal_total = 0;  // how many elements have key == this->key
  std::vector<int64_t> equal_before;  // per chunk: keys == key in all earlier chunks (split only)

  bool split() const { return !equal_before.empty(); }
  // How many elements with key == this->key chunk c keeps, counting from its lowest index.
  int64_t quota(int64_t c) const {
    if (!split()) return INT64_MAX;
    return std::max<int64_t>(0, equal_kept - equal_before[c]);
  }
};

// First level: the bucket (key >> shift) that holds the k-th largest key.
struct Bucket {
  int shift = 0;       // first-level bin = key >> shift
  uint32_t bin = 0;    // the boundary bin
  int64_t above = 0;   // elements in higher bins (all kept)
  int64_t count = 0;   // elements in the boundary bin
};

// Building blocks (also used by prune.cpp's sampled fast path).

// total[b] = how many keys bin_of sends to bin b; bin_of(key, h) increments h[bin] (or skips the
// key). Per-thread uint32 counts over fixed chunks, flushed into int64 before they could overflow.
// Integer sums: the result does not depend on the thread count.
template <class KeyFn, class BinFn>
void histogram(int64_t n, KeyFn key_of, BinFn bin_of, int64_t bins, std::vector<int64_t>& total) {
  total.assign(bins, 0);
  const int64_t chunks = num_chunks(n);
#pragma omp parallel if (chunks > 1)
  {
    // Private copies: the hot loop must not reload captured state after every histogram store.
    const KeyFn key = key_of;
    const BinFn bin = bin_of;
    std::vector<uint32_t> local(bins, 0);
    uint32_t* const h = local.data();
    int64_t pending = 0;
    auto flush = [&]() {
#pragma omp critical(pyfuse_select_hist)
      for (int64_t b = 0; b < bins; ++b) total[b] += local[b];
      std::fill(local.begin(), local.end(), 0u);
      pending = 0;
    };
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks; ++c) {
      if (pending + kChunk > int64_t(UINT32_MAX)) flush();
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) bin(key(i), h);
      pending += kChunk;
    }
    flush();
  }
}

// Packs flags[0, 64) (0/1 bytes) into one word, flag b to bit b, by a carry-free multiply per 8 flags.
inline uint64_t pack_flags(const uint8_t* flags) {
  uint64_t word = 0;
  for (int b = 0; b < 8; ++b) {
    uint64_t eight;
    memcpy(&eight, flags + 8 * b, sizeof(eight));
    word |= ((eight * 0x0102040810204080ull) >> 56) << (8 * b);
  }
  return word;
}

// Calls visit(j) for every j < len with flags[j] == 1, in increasing order, 64 flags per step (the band
// candidates of a block are sparse). flags must have room for len rounded up to 64: the pad is zeroed here.
template <class Visit>
inline void for_each_flagged(uint8_t* flags, int64_t len, Visit visit) {
  const int64_t words = (len + 63) / 64;
  std::fill(flags + len, flags + words * 64, uint8_t(0));
  for (int64_t w = 0; w < words; ++w) {
    for (uint64_t bits = pack_flags(flags + 64 * w); bits; bits &= bits - 1) visit(64 * w + __builtin_ctzll(bits));
  }
}

// Scans bins from the top: the bin where the running count reaches `need` (1 <= need <= total).
inline uint32_t top_bin(const std::vector<int64_t>& hist, int64_t need, int64_t* above) {
  int64_t acc = 0;
  for (int64_t b = int64_t(hist.size()) - 1; b >= 0; --b) {
    if (acc + hist[b] >= need) {
      *above = acc;
      return uint32_t(b);
    }
    acc += hist[b];
  }
  *above = acc;  // unreachable when need <= total
  return 0;
}

// Pass 1. Requires 0 < k <= n.
template <int kKeyBits, class KeyFn>
Bucket find_bucket(int64_t n, int64_t k, KeyFn key_of) {
  static_assert(kKeyBits >= 1 && kKeyBits <= 31, "keys must leave bit 31 clear");
  Bucket b;
  b.shift = kKeyBits > 16 ? kKeyBits - 16 : 0;
  const int shift = b.shift;
  std::vector<int64_t> hist;
  histogram(
      n, key_of, [shift](uint32_t key, uint32_t* h) { ++h[key >> shift]; }, int64_t(1) << (kKeyBits - shift),
      hist);
  b.bin = top_bin(hist, k, &b.above);
  b.count = hist[b.bin];
  return b;
}

// Counts keys == key per chunk and returns the exclusive scan (ties split across chunks).
template <class KeyFn>
std::vector<int64_t> equal_before(int64_t n, uint32_t key, KeyFn key_of) {
  const int64_t chunks = num_chunks(n);
  std::vector<int64_t> before(chunks, 0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    int64_t cnt = 0;
    for (int64_t i = c * kChunk; i < end; ++i) cnt += key_of(i) == key;
    before[c] = cnt;
  }
  int64_t acc = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t cnt = before[c];
    before[c] = acc;
    acc += cnt;
  }
  return before;
}

// The threshold inside bucket b, given the histogram of the bucket's low key bits (empty when
// b.shift == 0). No tie-count pass: equal_before stays empty.
inline Threshold threshold_in_bucket(const Bucket& b, const std::vector<int64_t>& low_hist, int64_t k) {
  Threshold t;
  const int64_t need = k - b.above;  // 1..b.count
  if (b.shift == 0) {
    t.key = b.bin;
    t.equal_total = b.count;
    t.equal_kept = need;
  } else {
    int64_t above_low = 0;
    const uint32_t low = top_bin(low_hist, need, &above_low);
    t.key = (b.bin << b.shift) | low;
    t.equal_total = low_hist[low];
    t.equal_kept = need - above_low;
  }
  return t;
}

// Passes 2 (+3). Requires 0 < k <= n and b = find_bucket(n, k, key_of).
template <int kKeyBits, class KeyFn>
Threshold refine(const Bucket& b, int64_t n, int64_t k, KeyFn key_of) {
  std::vector<int64_t> low_hist;
  if (b.shift > 0) {
    const int shift = b.shift;
    const uint32_t bin = b.bin, mask = (uint32_t(1) << shift) - 1u;
    histogram(
        n, key_of,
        [=](uint32_t key, uint32_t* h) {
          if ((key >> shift) == bin) ++h[key & mask];
        },
        int64_t(1) << shift, low_hist);
  }
  Threshold t = threshold_in_bucket(b, low_hist, k);
  if (t.equal_kept < t.equal_total) t.equal_before = equal_before(n, t.key, key_of);
  return t;
}

// A key band [lo, hi) that holds the k-th largest of n keys with high probability, estimated from a
// sample of n/64 keys (at least min(n/4, 65536)) taken as runs of 64 consecutive elements spread evenly
// (cache friendly, deterministic), with a 4-sigma binomial margin on the sampled rank. `expected` is the
// estimated number of keys inside the band. Costs 1/64 of a full histogram pass; callers must check the
// band (count the keys >= hi and inside it) and fall back to select_threshold when it misses.
struct Band {
  uint32_t lo = 0, hi = 0;
  int64_t expected = 0;
};

// The sample's geometry: `size` keys, sample i at flat index index(i).
struct SampleGeometry {
  static constexpr int64_t kRun = 64;
  int64_t stride, size;
  explicit SampleGeometry(int64_t n) {
    const int64_t runs = std::max(n / 64, std::min<int64_t>(n / 4, 65536)) / kRun;
    stride = n / runs;
    size = runs * kRun;
  }
  int64_t index(int64_t i) const { return i / kRun * stride + i % kRun; }
};

template <int kKeyBits, class KeyFn>
Band sample_band(int64_t n, int64_t k, KeyFn key_of) {
  constexpr int shift = kKeyBits > 16 ? kKeyBits - 16 : 0;
  const SampleGeometry g(n);
  const int64_t s = g.size;
  std::vector<int64_t> hist;
  histogram(
      s, [&key_of, g](int64_t i) { return key_of(g.index(i)); },
      [](uint32_t key, uint32_t* h) { ++h[key >> shift]; }, int64_t(1) << (kKeyBits - shift), hist);
  const double p = double(k) / double(n), rank = p * double(s);
  const double margin = 4.0 * std::sqrt(double(s) * p * (1.0 - p)) + 2.0;
  const int64_t upper = int64_t(rank - margin), lower = int64_t(rank + margin) + 1;  // sample ranks
  int64_t unused;
  const uint32_t top = top_bin(hist, std::max<int64_t>(upper, 1), &unused);
  const uint32_t bottom = lower > s ? 0u : top_bin(hist, lower, &unused);
  Band b;
  b.hi = upper < 1 ? (uint32_t(1) << kKeyBits) : (top + 1u) << shift;
  b.lo = bottom << shift;
  int64_t sampled = 0;
  for (uint32_t bin = bottom; bin < (b.hi >> shift); ++bin) sampled += hist[bin];
  b.expected = sampled * (n / s);
  return b;
}

// The most frequent exact keys inside a band, from the same sample as sample_band (a second read of it):
// at most max_keys of them, most frequent first, each with its estimated count over all n keys. A band
// crowded by a few heavily tied keys (deltas of 16-bit weights) can count those instead of storing them.
struct HeavyKey {
  uint32_t key;
  int64_t expected;
};

template <class KeyFn>
std::vector<HeavyKey> heavy_keys(int64_t n, const Band& band, KeyFn key_of, int max_keys) {
  const SampleGeometry g(n);
  std::vector<uint32_t> in;
  for (int64_t i = 0; i < g.size; ++i) {
    const uint32_t key = key_of(g.index(i));
    if (key >= band.lo && key < band.hi) in.push_back(key);
  }
  std::sort(in.begin(), in.end());
  std::vector<HeavyKey> runs;
  for (size_t i = 0; i < in.size();) {
    size_t j = i;
    while (j < in.size() && in[j] == in[i]) ++j;
    runs.push_back({in[i], int64_t(j - i) * (n / g.size)});
    i = j;
  }
  std::sort(runs.begin(), runs.end(), [](const HeavyKey& a, const HeavyKey& b) { return a.expected > b.expected; });
  if (int(runs.size()) > max_keys) runs.resize(size_t(max_keys));
  return runs;
}

// The threshold among the m candidates of a band (every key in [lo, hi)) and, optionally, `extras` keys of the
// band given only by their counts (heavily tied keys the caller counted instead of storing), for need in
// [1, m + their counts]: the need-th largest key, and how many candidates equal it and are kept (equal_before
// stays empty: the caller walks its candidates in index order). One pass into at most 2048 bins of key - lo
// (L1-sized, unlike a 16-bit first-level histogram, which costs more to clear and scan than a few hundred
// thousand candidates), then an exact pass over the boundary bin's keys.
template <class KeyFn>
Threshold select_in_band(int64_t m, int64_t need, uint32_t lo, uint32_t hi, KeyFn key_of, const uint32_t* extra_keys = nullptr,
                         const int64_t* extra_counts = nullptr, int extras = 0) {
  int shift = 0;
  while (((hi - lo - 1u) >> shift) >= 2048u) ++shift;
  std::vector<int64_t> hist(((hi - lo - 1u) >> shift) + 1u, 0);
  for (int64_t j = 0; j < m; ++j) ++hist[(key_of(j) - lo) >> shift];
  for (int e = 0; e < extras; ++e) hist[(extra_keys[e] - lo) >> shift] += extra_counts[e];
  int64_t above = 0;
  const uint32_t bin = top_bin(hist, need, &above);
  std::vector<uint32_t> in_bin;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t key = key_of(j);
    if (((key - lo) >> shift) == bin) in_bin.push_back(key);
  }
  const int64_t rank = need - above;  // 1..hist[bin], counted from the largest
  Threshold t;
  // The bin's extras, each with its count (no more than `extras` of them).
  std::vector<std::pair<uint32_t, int64_t>> bin_extras;
  for (int e = 0; e < extras; ++e) {
    if (((extra_keys[e] - lo) >> shift) == bin) bin_extras.push_back({extra_keys[e], extra_counts[e]});
  }
  if (bin_extras.empty()) {
    std::nth_element(in_bin.begin(), in_bin.begin() + (rank - 1), in_bin.end(), std::greater<uint32_t>());
    t.key = in_bin[size_t(rank - 1)];
  } else {  // walk the bin's keys from the largest, each extra weighted by its count
    std::sort(in_bin.begin(), in_bin.end(), std::greater<uint32_t>());
    std::sort(bin_extras.begin(), bin_extras.end(), std::greater<std::pair<uint32_t, int64_t>>());
    size_t i = 0, e = 0;
    for (int64_t seen = 0;;) {
      const uint32_t key = std::max(i < in_bin.size() ? in_bin[i] : 0u, e < bin_extras.size() ? bin_extras[e].first : 0u);
      int64_t count = 0;
      for (; i < in_bin.size() && in_bin[i] == key; ++i) ++count;
      for (; e < bin_extras.size() && bin_extras[e].first == key; ++e) count += bin_extras[e].second;
      if (seen + count >= rank) {
        t.key = key;
        break;
      }
      seen += count;
    }
  }
  int64_t greater = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t key = key_of(j);
    greater += key > t.key && ((key - lo) >> shift) == bin;
    t.equal_total += key == t.key;
  }
  for (const auto& e : bin_extras) {
    greater += e.first > t.key ? e.second : 0;
    t.equal_total += e.first == t.key ? e.second : 0;
  }
  t.equal_kept = rank - greater;
  return t;
}

template <int kKeyBits, class KeyFn>
Threshold select_threshold(int64_t n, int64_t k, KeyFn key_of) {
  Threshold t;
  if (k <= 0) {
    t.key = UINT32_MAX;  // above every valid key: nothing kept
    return t;
  }
  if (k >= n) return t;  // key 0, no split: everything kept
  return refine<kKeyBits>(find_bucket<kKeyBits>(n, k, key_of), n, k, key_of);
}

}  // namespace select
}  // namespace pyfuse
