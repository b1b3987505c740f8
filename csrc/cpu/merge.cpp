// pyfuse::merge_task_vectors on the CPU (OpenMP).
//
// Statistics pass, per model: exact top-k thresholds of |x_i - base| for magnitude/breadcrumbs in one
// read of x_i and base (a sampled key band, then the exact threshold among the band's few candidates;
// cpu/select.h's full histogram select when the band misses), then the L1 sums of d_i and of its masked
// version for rescale="l1" (which records the random keep decisions as bits). Fused pass: each thread
// takes a segment (a tile, or one row for della), recomputes every delta and mask (random ones with
// cpu/philox_lanes.h's vector Philox in the packed layout, or replayed from the recorded bits) into a K x
// segment scratch, elects the sign, combines and writes the output once. Extra memory: per thread K x segment
// floats (+ della's row sort), the band candidates (about 1% of n, at most 1/20 of the input's bytes), and the
// keep bits (1/32 of a float32 input per model); no K x n float buffers. Results do not depend on the thread
// count: per-element math only, L1 partial sums in fixed segments.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/avx512_paths.h"
#include "cpu/band_candidates.h"
#include "cpu/clones.h"
#include "cpu/philox_lanes.h"
#include "cpu/select.h"
#include "pyfuse/merge.h"

namespace pyfuse {
namespace cpu {
namespace {

using merge::Config;
using merge::Model;

constexpr int64_t kTile = 2048;  // fused-pass segment (K x kTile floats of scratch per thread)
constexpr int kLanes = 8;        // L1 partial sums: fixed lanes, so the order does not depend on the ISA
constexpr int64_t kParallelMin = 1 << 16;   // below this many elements a parallel region costs more than it saves
// Parallel loops hand out work dynamically (8 segments, or one 64K chunk, at a time): on a shared machine a
// preempted thread must not hold the others at the barrier. Results never depend on who computes what. The
// fused pass hands out 2 MiB of output at a time (kOutputChunk): a fresh output's huge pages are zeroed by the
// kernel on first touch, and with smaller pieces both threads fault in the same huge page, one waiting for the
// other (task arithmetic 4096² took 10% longer).
constexpr int64_t kOutputChunk = int64_t{2} << 20;

template <int32_t kDtype>
PYFUSE_INLINE float load(const void* p, int64_t i) {
  if constexpr (kDtype == kFloat32) return static_cast<const float*>(p)[i];
  if constexpr (kDtype == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// The random keep decisions of one segment as bits (bit j % 64 of word j / 64 is element start + j). With
// rescale="l1" the statistics pass records them and the fused pass replays them: recomputing Philox costs more
// than all the reads of that pass.
struct KeepBits {
  uint64_t* words = nullptr;  // this segment's words for model 0; model i at words + i * per_model
  int64_t per_model = 0;
  bool replay = false;
  // Whether this segment's decisions are replayed from words (no Philox, no keep probabilities needed).
  bool replaying() const { return words != nullptr && replay; }
};

// The merged values res[0, len) into the output at element start, in the output dtype.
PYFUSE_INLINE void store_out(const Config& c, int64_t start, int64_t len, const float* res) {
  if (c.out_dtype == kFloat32) {
    std::copy(res, res + len, static_cast<float*>(c.out) + start);
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(c.out) + start;
  if (c.out_dtype == kBFloat16) {  // branch-free rounding: this loop vectorizes
    for (int64_t j = 0; j < len; ++j) out[j] = float_to_bf16(res[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) out[j] = float_to_fp16(res[j]);
  }
}

struct Scratch {
  std::vector<float> base, masked, total, acc, q, res;
  std::vector<uint32_t> flip, rank;
  std::vector<uint64_t> pairs, pairs_tmp;  // row_ranks
  std::vector<uint32_t> rank_counts;
  KeepBits keep_bits;  // the current segment's recorded random decisions, if any
  Scratch(int64_t k, int64_t seg)
      : base(seg), masked(k * seg), total(seg), acc(seg), q(seg), res(seg), flip(seg) {}
};

// DELLA: the ascending ranks of |d[j]| in a row of len (ties to the lower index), in s.rank. LSD radix sort
// of (key << 32 | j) pairs on the 31-bit magnitude key, kBits per digit: each pass is stable, so equal keys
// keep index order, and moving the pairs themselves avoids an indirect key load per element and pass. One
// read of the row builds the pairs and every digit's histogram.
template <int kBits>
const uint32_t* row_ranks_radix(const float* d, int64_t len, Scratch& s) {
  constexpr int kDigits = (31 + kBits - 1) / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  s.pairs.resize(len);
  s.pairs_tmp.resize(len);
  s.rank.resize(len);
  std::vector<uint32_t>& count = s.rank_counts;  // [kDigits][2^kBits]
  count.assign(kDigits << kBits, 0u);
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t key = merge::magnitude_key(d[j]);
    s.pairs[j] = static_cast<uint64_t>(key) << 32 | static_cast<uint64_t>(j);
    for (int digit = 0; digit < kDigits; ++digit) ++count[(digit << kBits) + ((key >> (kBits * digit)) & kMask)];
  }
  for (int digit = 0; digit < kDigits; ++digit) {
    const int shift = 32 + kBits * digit;
    uint32_t* c = count.data() + (digit << kBits);
    if (c[(s.pairs[0] >> shift) & kMask] == len) continue;  // one digit value: order unchanged
    uint32_t next = 0;  // c[b] becomes the first position of digit b
    for (uint32_t b = 0; b <= kMask; ++b) {
      const uint32_t n = c[b];
      c[b] = next;
      next += n;
    }
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t p = s.pairs[j];
      s.pairs_tmp[c[(p >> shift) & kMask]++] = p;
    }
    s.pairs.swap(s.pairs_tmp);
  }
  for (int64_t p = 0; p < len; ++p) s.rank[static_cast<uint32_t>(s.pairs[p])] = static_cast<uint32_t>(p);
  return s.rank.data();
}

// Three 11-bit digits for long rows, four 8-bit ones where the bigger histograms' scans would dominate.
inline const uint32_t* row_ranks(const float* d, int64_t len, Scratch& s) {
  return len >= 2048 ? row_ranks_radix<11>(d, len, s) : row_ranks_radix<8>(d, len, s);
}

// masked[j] = select(masked[j], bit j of bits) for j < len, 32 bits at a time (a variable shift per lane).
PYFUSE_INLINE void replay_bits(const uint64_t* bits, int64_t len, float* masked) {
  for (int64_t h = 0; h < len; h += 32) {
    const uint32_t half = static_cast<uint32_t>(bits[h / 64] >> (h & 32));
    float* m = masked + h;
    if (h + 32 <= len) {
      for (uint32_t b = 0; b < 32; ++b) m[b] = merge::select(m[b], (half >> b) & 1u);
    } else {
      for (uint32_t b = 0; b < static_cast<uint32_t>(len - h); ++b) m[b] = merge::select(m[b], (half >> b) & 1u);
    }
  }
}

constexpr int64_t kRun = 512;  // uniforms per philox_uniforms call: stays in L1, call cost amortised
static_assert(kRun % 64 == 0, "runs start on a bit word");

// keep[l] = (u_l < p(j0 + l)) for the packed Philox uniforms u_l of elements start + j0 + l, l < cnt; recorded
// into `bits` (this model's words of the segment, or null) as bits j0 + l.
template <class ProbFn>
PYFUSE_INLINE void keep_run(const Config& c, uint32_t mi, int64_t start, int64_t j0, int64_t cnt, ProbFn p,
                            uint64_t* bits, uint8_t* keep) {
  alignas(64) float u[kRun];
  philox_uniforms(c.seed, static_cast<uint64_t>(start + j0), mi, c.purpose, u, cnt, kPhiloxPacked);
  for (int64_t l = 0; l < cnt; ++l) keep[l] = static_cast<uint8_t>(u[l] < p(j0 + l));
  if (bits != nullptr) {
    const int64_t words = (cnt + 63) / 64;
    std::fill(keep + cnt, keep + words * 64, uint8_t(0));
    for (int64_t w = 0; w < words; ++w) bits[j0 / 64 + w] = select::pack_flags(keep + 64 * w);
  }
}

// masked[j] = select(masked[j], u_j < p(j)) for the Philox uniform u_j of element start + j (merge::keep_random),
// or the decisions recorded in `bits` (see KeepBits).
template <class ProbFn>
PYFUSE_INLINE void keep_random_segment(const Config& c, uint32_t mi, int64_t start, int64_t len, ProbFn p,
                                       const KeepBits& kb, float* masked) {
  alignas(64) uint8_t keep[kRun];
  uint64_t* bits = kb.words == nullptr ? nullptr : kb.words + mi * kb.per_model;
  if (kb.replaying()) return replay_bits(bits, len, masked);
  for (int64_t j0 = 0; j0 < len; j0 += kRun) {
    const int64_t cnt = std::min(kRun, len - j0);
    keep_run(c, mi, start, j0, cnt, p, bits, keep);
    for (int64_t l = 0; l < cnt; ++l) masked[j0 + l] = merge::select(masked[j0 + l], keep[l]);
  }
}

// merge::in_top(key, start + j, t, b) inside one segment as a 32-bit test: key > (j < split ? low : high).
// Keys are |d| bits < 2^31, so they compare as int32; t = UINT32_MAX (nothing kept) never passes.
struct TopCut {
  int32_t low, high, split;
};

inline TopCut top_cut(uint32_t t, int64_t b, int64_t start, int64_t len) {
  if (t == UINT32_MAX) return {INT32_MAX, INT32_MAX, 0};
  const int64_t split = std::min(std::max<int64_t>(b - start, 0), len);
  return {static_cast<int32_t>(t) - 1, static_cast<int32_t>(t), static_cast<int32_t>(split)};
}

// masked[j] = m_i at element start + j: the delta where sparsification keeps it, else 0.
template <int32_t kDtype>
PYFUSE_INLINE void masked_segment(const Config& c, const void* x, const Model& m, uint32_t mi, int64_t start,
                                  int64_t len, Scratch& s, float* masked) {
  const float* bt = s.base.data();
  if (!m.keep_all && (c.sparsify == merge::kMagnitude || c.sparsify == merge::kBreadcrumbs)) {  // merge::keep_top
    const TopCut keep = top_cut(m.t_keep, m.b_keep, start, len), drop = top_cut(m.t_drop, m.b_drop, start, len);
    for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {  // delta and mask in one sweep
      const float d = load<kDtype>(x, start + j) - bt[j];
      const int32_t key = static_cast<int32_t>(merge::magnitude_key(d));
      const uint32_t in_keep = key > (j < keep.split ? keep.low : keep.high);
      const uint32_t in_drop = key > (j < drop.split ? drop.low : drop.high);
      masked[j] = merge::select(d, in_keep & (in_drop ^ 1u));
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j) masked[j] = load<kDtype>(x, start + j) - bt[j];
  if (m.keep_all) return;
  if (c.sparsify == merge::kRandom) {
    const float p = m.p_keep;
    keep_random_segment(c, mi, start, len, [p](int64_t) { return p; }, s.keep_bits, masked);
  } else if (c.sparsify == merge::kDella) {  // the segment is one row
    // Recorded decisions (rescale "l1") need no ranks: keep_random_segment replays them.
    const uint32_t* rank = s.keep_bits.replaying() ? nullptr : row_ranks(masked, len, s);
    keep_random_segment(
        c, mi, start, len, [&m, rank, len](int64_t j) { return merge::della_prob(m, rank[j], len); }, s.keep_bits,
        masked);
  }
}

template <int32_t kDtype>
PYFUSE_INLINE void load_base(const Config& c, int64_t start, int64_t len, Scratch& s) {
  float* bt = s.base.data();
  if (c.base == nullptr) {
    std::fill(bt, bt + len, 0.0f);
  } else {
    for (int64_t j = 0; j < len; ++j) bt[j] = load<kDtype>(c.base, start + j);
  }
}

// The election and the combination of K masked models in one sweep per element: K, the election term and
// whether the divisor counts agreeing models fixed at compile time, so that the model loops unroll and the
// element loop vectorizes. The same operations in the same order as fused_body's generic sweeps.
template <int kK, int32_t kConsensus, bool kAgreeQ>
PYFUSE_INLINE void elect_combine(const float* const* masked, const float* f, const float* alpha, const float* dq,
                                 float q0, int64_t len, float* __restrict ac, float* __restrict qq) {
  const float* mk[kK];
  float fi[kK], ai[kK], di[kK];
  for (int i = 0; i < kK; ++i) {
    mk[i] = masked[i];
    fi[i] = f[i];
    ai[i] = alpha[i];
    di[i] = dq[i];
  }
  for (int64_t j = 0; j < len; ++j) {
    float tot = 0.0f;
    for (int i = 0; i < kK; ++i) tot += merge::election_term(merge::mul_rn(fi[i], mk[i][j]), kConsensus);
    const uint32_t flip = merge::flip_of(tot);
    float a_sum = 0.0f, q_sum = q0;
    for (int i = 0; i < kK; ++i) {
      const uint32_t agree = merge::agrees(merge::mul_rn(fi[i], mk[i][j]), flip);
      a_sum += merge::select(merge::mul_rn(ai[i], mk[i][j]), agree);
      if (kAgreeQ) q_sum += merge::select(di[i], agree);
    }
    ac[j] = a_sum;
    qq[j] = q_sum;
  }
}

// elect_combine for 2 to 4 models (the common merges); false for other K (generic_elect_combine then).
PYFUSE_INLINE bool elect_combine_fixed_k(const Config& c, const Model* models, Scratch& s, int64_t stride, int64_t len,
                                         float* ac, float* qq) {
  if (c.k < 2 || c.k > 4) return false;
  const float* masked[4];
  float f[4], alpha[4], dq[4];
  for (int32_t i = 0; i < c.k; ++i) {
    masked[i] = &s.masked[i * stride];
    f[i] = c.weighted ? models[i].alpha : models[i].scale;  // merge::election_input
    alpha[i] = models[i].alpha;
    dq[i] = merge::divisor_term(models[i], c.normalize);
  }
  const bool agree_q = c.normalize == merge::kAgreeWeight || c.normalize == merge::kAgreeCount;
  const float q0 = c.normalize == merge::kAllWeight ? c.all_weight_q : 0.0f;
  const bool count = c.consensus == merge::kCount;
#define PYFUSE_ELECT(K)                                                                                     \
  if (c.k == K) {                                                                                           \
    if (count) {                                                                                            \
      agree_q ? elect_combine<K, merge::kCount, true>(masked, f, alpha, dq, q0, len, ac, qq)                \
              : elect_combine<K, merge::kCount, false>(masked, f, alpha, dq, q0, len, ac, qq);              \
    } else {                                                                                                \
      agree_q ? elect_combine<K, merge::kSum, true>(masked, f, alpha, dq, q0, len, ac, qq)                  \
              : elect_combine<K, merge::kSum, false>(masked, f, alpha, dq, q0, len, ac, qq);                \
    }                                                                                                       \
    return true;                                                                                            \
  }
  PYFUSE_ELECT(2)
  PYFUSE_ELECT(3)
  PYFUSE_ELECT(4)
#undef PYFUSE_ELECT
  return false;
}

// Election and combination (into s.acc, s.q) for any K and knobs: one sweep over the segment per step and model.
PYFUSE_INLINE void generic_elect_combine(const Config& c, const Model* models, Scratch& s, int64_t stride,
                                         int64_t len) {
  // Scalars copied into locals and restrict pointers: a float store could otherwise alias the Model and
  // Config floats, which keeps GCC from vectorizing these loops.
  float* __restrict tot = s.total.data();
  float* __restrict ac = s.acc.data();
  float* __restrict qq = s.q.data();
  uint32_t* __restrict fl = s.flip.data();
  const int32_t consensus = c.consensus, normalize = c.normalize;
  const bool vote = consensus != merge::kConsensusNone;
  const bool agree_q = normalize == merge::kAgreeWeight || normalize == merge::kAgreeCount;
  std::fill(fl, fl + len, 0u);
  if (vote) {
    std::fill(tot, tot + len, 0.0f);
    for (int32_t i = 0; i < c.k; ++i) {
      const float* __restrict mk = &s.masked[i * stride];
      const float f = c.weighted ? models[i].alpha : models[i].scale;  // merge::election_input
      if (consensus == merge::kCount) {
        for (int64_t j = 0; j < len; ++j) tot[j] += merge::election_term(merge::mul_rn(f, mk[j]), merge::kCount);
      } else {
        for (int64_t j = 0; j < len; ++j) tot[j] += merge::election_term(merge::mul_rn(f, mk[j]), merge::kSum);
      }
    }
    for (int64_t j = 0; j < len; ++j) fl[j] = merge::flip_of(tot[j]);
  }
  std::fill(ac, ac + len, 0.0f);
  std::fill(qq, qq + len, normalize == merge::kAllWeight ? c.all_weight_q : 0.0f);
  for (int32_t i = 0; i < c.k; ++i) {
    const float* __restrict mk = &s.masked[i * stride];
    const float alpha = models[i].alpha, f = c.weighted ? models[i].alpha : models[i].scale;
    const float dq = merge::divisor_term(models[i], normalize);
    if (!vote) {
      for (int64_t j = 0; j < len; ++j) ac[j] += merge::mul_rn(alpha, mk[j]);
      if (agree_q) {
        for (int64_t j = 0; j < len; ++j) qq[j] += dq;
      }
      continue;
    }
    if (agree_q) {  // sum and divisor in one sweep
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t a = merge::agrees(merge::mul_rn(f, mk[j]), fl[j]);
        ac[j] += merge::select(merge::mul_rn(alpha, mk[j]), a);
        qq[j] += merge::select(dq, a);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t a = merge::agrees(merge::mul_rn(f, mk[j]), fl[j]);
        ac[j] += merge::select(merge::mul_rn(alpha, mk[j]), a);
      }
    }
  }
}

// Fused pass over one segment: masks, election, combination, output.
template <int32_t kDtype>
PYFUSE_INLINE void fused_body(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                              int64_t stride, Scratch& s) {
  load_base<kDtype>(c, start, len, s);
  for (int32_t i = 0; i < c.k; ++i) masked_segment<kDtype>(c, x[i], models[i], i, start, len, s, &s.masked[i * stride]);
  float* __restrict ac = s.acc.data();
  float* __restrict qq = s.q.data();
  const bool vote = c.consensus != merge::kConsensusNone;
  if (!(vote && elect_combine_fixed_k(c, models, s, stride, len, ac, qq))) {
    generic_elect_combine(c, models, s, stride, len);
  }
  float* __restrict res = s.res.data();
  const float* __restrict bt = s.base.data();
  const int32_t normalize = c.normalize;
  const float lam = c.lam;
  for (int64_t j = 0; j < len; ++j) res[j] = merge::finish(ac[j], qq[j], normalize, lam, bt[j]);
  store_out(c, start, len, res);
}

// Linear merge of kK = 1..4 models (with a base, or task vectors: base 0): each element in one step from all
// inputs (a loop that reads the inputs together runs at the machine's bandwidth; one sweep per model over L1
// blocks took 1.5x as long).
template <int32_t kDtype, int kK, bool kBase>
PYFUSE_INLINE void linear_fixed_k(const Config& c, const void* const* x, const Model* models, int64_t start,
                                  int64_t len, float q, float* __restrict res) {
  constexpr int64_t kBlock = 512;
  const void* xs[kK];
  float alpha[kK];
  for (int i = 0; i < kK; ++i) {
    xs[i] = x[i];
    alpha[i] = models[i].alpha;
  }
  const int32_t normalize = c.normalize;
  const float lam = c.lam;
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t cnt = std::min(kBlock, len - j0);
    for (int64_t j = 0; j < cnt; ++j) {
      const float b = kBase ? load<kDtype>(c.base, start + j0 + j) : 0.0f;
      float a = 0.0f;
      for (int i = 0; i < kK; ++i) a += merge::mul_rn(alpha[i], load<kDtype>(xs[i], start + j0 + j) - b);
      res[j] = merge::finish(a, q, normalize, lam, b);
    }
    store_out(c, start + j0, cnt, res);
  }
}

template <int32_t kDtype, int kK>
PYFUSE_INLINE void linear_k(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                            float q, float* res) {
  if (c.base != nullptr) return linear_fixed_k<kDtype, kK, true>(c, x, models, start, len, q, res);
  linear_fixed_k<kDtype, kK, false>(c, x, models, start, len, q, res);
}

// Linear merges (task arithmetic: no sparsification, no election, no per-element divisor): the same arithmetic
// as fused_body, element by element in model order: linear_fixed_k for 1 to 4 models, else over L1-sized blocks,
// one sweep per model.
template <int32_t kDtype>
PYFUSE_INLINE void linear_body(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                               Scratch& s) {
  constexpr int64_t kBlock = 512;
  float* __restrict ac = s.acc.data();
  float* __restrict bt = s.base.data();
  float* __restrict res = s.res.data();
  const int32_t normalize = c.normalize;
  const float q = normalize == merge::kAllWeight ? c.all_weight_q : 0.0f, lam = c.lam;
  switch (c.k) {
    case 1: return linear_k<kDtype, 1>(c, x, models, start, len, q, res);
    case 2: return linear_k<kDtype, 2>(c, x, models, start, len, q, res);
    case 3: return linear_k<kDtype, 3>(c, x, models, start, len, q, res);
    case 4: return linear_k<kDtype, 4>(c, x, models, start, len, q, res);
    default: break;
  }
  for (int64_t j0 = 0; j0 < len; j0 += kBlock) {
    const int64_t cnt = std::min(kBlock, len - j0);
    load_base<kDtype>(c, start + j0, cnt, s);
    std::fill(ac, ac + cnt, 0.0f);
    for (int32_t i = 0; i < c.k; ++i) {
      const void* xi = x[i];
      const float alpha = models[i].alpha;
      for (int64_t j = 0; j < cnt; ++j) ac[j] += merge::mul_rn(alpha, load<kDtype>(xi, start + j0 + j) - bt[j]);
    }
    for (int64_t j = 0; j < cnt; ++j) res[j] = merge::finish(ac[j], q, normalize, lam, bt[j]);
    store_out(c, start + j0, cnt, res);
  }
}

// before[l] += |x - base|, after[l] += |masked| over the elements j = l (mod kLanes) of one segment, in order.
// GCC vector types: the lane order is the algorithm's (one vector of kLanes doubles), and GCC's SLP pass would
// otherwise keep the eight accumulators in scalar registers.
typedef float Floats8 __attribute__((vector_size(32)));
typedef double Doubles8 __attribute__((vector_size(64)));
typedef uint32_t Words8 __attribute__((vector_size(32)));
static_assert(kLanes == 8, "one vector of lanes");

PYFUSE_INLINE void add_abs(Doubles8& acc, Floats8 v) {  // acc += |v| (by reference: no 64-byte vector ABI)
  Words8 w;
  memcpy(&w, &v, sizeof(w));
  w &= 0x7fffffffu;
  memcpy(&v, &w, sizeof(v));
  acc += __builtin_convertvector(v, Doubles8);
}

template <int32_t kDtype>
PYFUSE_INLINE void l1_lanes(const void* x, int64_t start, const float* bt, const float* mk, int64_t len,
                            double* before, double* after) {
  Doubles8 b = {0}, a = {0};
  int64_t j0 = 0;
  for (; j0 + kLanes <= len; j0 += kLanes) {
    Floats8 xv, bv, mv;
    if constexpr (kDtype == kFloat32) {
      memcpy(&xv, static_cast<const float*>(x) + start + j0, sizeof(xv));
    } else {
      for (int l = 0; l < kLanes; ++l) xv[l] = load<kDtype>(x, start + j0 + l);
    }
    memcpy(&bv, bt + j0, sizeof(bv));
    memcpy(&mv, mk + j0, sizeof(mv));
    add_abs(b, xv - bv);
    add_abs(a, mv);
  }
  for (int l = 0; j0 + l < len; ++l) {
    b[l] += static_cast<double>(std::fabs(load<kDtype>(x, start + j0 + l) - bt[j0 + l]));
    a[l] += static_cast<double>(std::fabs(mk[j0 + l]));
  }
  for (int l = 0; l < kLanes; ++l) {
    before[l] = b[l];
    after[l] = a[l];
  }
}

// l1_lanes's sums (same lanes, same order) for a random mask, in one sweep per run of kRun elements: the keep
// decisions (recorded into kb's bits), then |d| and |kept d| straight from x and the base tile; no masked array.
template <int32_t kDtype, class ProbFn>
PYFUSE_INLINE void l1_random_lanes(const Config& c, const void* x, uint32_t mi, int64_t start, int64_t len,
                                   const float* bt, ProbFn p, const KeepBits& kb, double* before, double* after) {
  static_assert(kRun % kLanes == 0, "runs start on lane 0");
  alignas(64) uint8_t keep[kRun];
  uint64_t* bits = kb.words == nullptr ? nullptr : kb.words + mi * kb.per_model;
  Doubles8 b = {0}, a = {0};
  for (int64_t j0 = 0; j0 < len; j0 += kRun) {
    const int64_t cnt = std::min(kRun, len - j0);
    keep_run(c, mi, start, j0, cnt, p, bits, keep);
    int64_t l0 = 0;
    for (; l0 + kLanes <= cnt; l0 += kLanes) {
      Floats8 d;
      Words8 on;
      for (int l = 0; l < kLanes; ++l) {
        d[l] = load<kDtype>(x, start + j0 + l0 + l) - bt[j0 + l0 + l];
        on[l] = 0u - keep[l0 + l];
      }
      Words8 w;
      memcpy(&w, &d, sizeof(w));
      w &= on;
      Floats8 kept;
      memcpy(&kept, &w, sizeof(kept));
      add_abs(b, d);
      add_abs(a, kept);
    }
    for (int l = 0; l0 + l < cnt; ++l) {  // the segment's last elements: lane l, as in l1_lanes
      const float d = load<kDtype>(x, start + j0 + l0 + l) - bt[j0 + l0 + l];
      b[l] += static_cast<double>(std::fabs(d));
      a[l] += static_cast<double>(std::fabs(merge::select(d, keep[l0 + l])));
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    before[l] = b[l];
    after[l] = a[l];
  }
}

// l1_random_lanes for a constant keep probability p with AVX-512 intrinsics: the same decisions, bits and sums
// (the same lanes in the same order: of each 16 elements, the first 8 into lanes 0-7, then the next 8). The keep
// decisions of 16 elements are one compare mask, which is also their 16 bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
inline __m512d add_halves(__m512d acc, __m512 v) {  // acc += v[0:8] in double, then acc += v[8:16]
  acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

template <int32_t kDtype>
__attribute__((noinline)) void l1_random_lanes_avx512(const Config& c, const void* x, uint32_t mi, int64_t start,
                                                      int64_t len, const float* bt, float p, const KeepBits& kb,
                                                      double* before, double* after) {
  alignas(64) float u[kRun];
  alignas(64) double lb[kLanes], la[kLanes];
  uint16_t* bits = kb.words == nullptr ? nullptr : reinterpret_cast<uint16_t*>(kb.words + mi * kb.per_model);
  const __m512 pv = _mm512_set1_ps(p);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512d b = _mm512_setzero_pd(), a = _mm512_setzero_pd();
  for (int64_t j0 = 0; j0 < len; j0 += kRun) {
    const int64_t cnt = std::min(kRun, len - j0);
    philox_uniforms(c.seed, static_cast<uint64_t>(start + j0), mi, c.purpose, u, cnt, kPhiloxPacked);
    int64_t l = 0;
    for (; l + 16 <= cnt; l += 16) {
      const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_load_ps(u + l), pv, _CMP_LT_OQ);
      if (bits != nullptr) bits[(j0 + l) / 16] = keep;
      const __m512 d = _mm512_sub_ps(load16<kDtype>(x, start + j0 + l), _mm512_loadu_ps(bt + j0 + l));
      const __m512 ad = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(d), abs_mask));
      b = add_halves(b, ad);
      a = add_halves(a, _mm512_maskz_mov_ps(keep, ad));
    }
    if (l < cnt) {  // the segment's last elements: element l into lane l % 8, as in l1_random_lanes
      _mm512_store_pd(lb, b);
      _mm512_store_pd(la, a);
      uint16_t word = 0;
      for (int64_t t = l; t < cnt; ++t) {
        const bool keep = u[t] < p;
        const float d = load<kDtype>(x, start + j0 + t) - bt[j0 + t];
        lb[t % kLanes] += static_cast<double>(std::fabs(d));
        la[t % kLanes] += static_cast<double>(std::fabs(merge::select(d, keep)));
        word = static_cast<uint16_t>(word | (uint32_t{keep} << (t - l)));
      }
      if (bits != nullptr) bits[(j0 + l) / 16] = word;
      b = _mm512_load_pd(lb);
      a = _mm512_load_pd(la);
    }
    // The rest of the run's last 64-bit word is zero, as keep_run writes it.
    for (int64_t q = (j0 + cnt + 15) / 16; bits != nullptr && q % 4 != 0; ++q) bits[q] = 0;
  }
  _mm512_storeu_pd(before, b);
  _mm512_storeu_pd(after, a);
}
#pragma GCC pop_options

// L1 statistics of one segment: lanes of sum |d| and sum |m| per model, sums[model][2][kLanes].
template <int32_t kDtype>
PYFUSE_INLINE void l1_body(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                           Scratch& s, double* sums) {
  load_base<kDtype>(c, start, len, s);
  float* mk = s.masked.data();
  const float* bt = s.base.data();
  for (int32_t i = 0; i < c.k; ++i) {
    double before[kLanes] = {0}, after[kLanes] = {0};
    const Model& m = models[i];
    if (!m.keep_all && c.sparsify == merge::kRandom) {
      const float p = m.p_keep;
      if (avx512_paths_usable()) {
        l1_random_lanes_avx512<kDtype>(c, x[i], i, start, len, bt, p, s.keep_bits, before, after);
      } else {
        l1_random_lanes<kDtype>(c, x[i], i, start, len, bt, [p](int64_t) { return p; }, s.keep_bits, before, after);
      }
    } else if (!m.keep_all && c.sparsify == merge::kDella) {  // the segment is one row
      for (int64_t j = 0; j < len; ++j) mk[j] = load<kDtype>(x[i], start + j) - bt[j];
      const uint32_t* rank = row_ranks(mk, len, s);
      l1_random_lanes<kDtype>(
          c, x[i], i, start, len, bt, [&m, rank, len](int64_t j) { return merge::della_prob(m, rank[j], len); },
          s.keep_bits, before, after);
    } else {
      masked_segment<kDtype>(c, x[i], m, i, start, len, s, mk);
      l1_lanes<kDtype>(x[i], start, bt, mk, len, before, after);
    }
    for (int l = 0; l < kLanes; ++l) {
      sums[(i * 2) * kLanes + l] = before[l];
      sums[(i * 2 + 1) * kLanes + l] = after[l];
    }
  }
}

// key_of(j) = |x_j - base_j| as a magnitude key (base null: 0), the keys every top-k set of a model selects on.
template <int32_t kDtype>
auto magnitude_keys(const void* x, const void* base) {
  return [x, base](int64_t j) {
    const float b = base == nullptr ? 0.0f : load<kDtype>(base, j);
    return merge::magnitude_key(load<kDtype>(x, j) - b);
  };
}

// A job's band: the keys lo <= key < hi are candidates, except up to two heavily tied keys inside it that are
// only counted (kNoKey: none; no key is that large).
constexpr uint32_t kNoKey = UINT32_MAX;
struct BandSpec {
  uint32_t lo, hi, heavy[2];
};
// Per fixed chunk and job: keys >= hi, and the count of each heavy key.
struct BandCounts {
  int64_t above = 0, heavy[2] = {0, 0};
};

// Keys |x - base| of elements [begin, begin + len) into key[] and candidate flags into flag[]; returns how
// many are flagged and adds to counts.
template <int32_t kDtype>
PYFUSE_INLINE int64_t band_body(const void* x, const void* base, int64_t begin, int64_t len, const BandSpec& sp,
                                uint32_t* key, uint8_t* flag, BandCounts* counts) {
  const uint32_t lo = sp.lo, hi = sp.hi, h0 = sp.heavy[0], h1 = sp.heavy[1];
  uint32_t in_band = 0, over = 0, eq0 = 0, eq1 = 0;  // 32-bit counts (blocks are short): no widening
  const auto key_of = magnitude_keys<kDtype>(x, base);
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t kk = key_of(begin + j);
    key[j] = kk;
    const uint32_t e0 = kk == h0, e1 = kk == h1;
    const uint8_t f = static_cast<uint8_t>((kk >= lo) & (kk < hi) & ((e0 | e1) ^ 1u));
    flag[j] = f;
    in_band += f;
    over += kk >= hi;
    eq0 += e0;
    eq1 += e1;
  }
  counts->above += over;
  counts->heavy[0] += eq0;
  counts->heavy[1] += eq1;
  return in_band;
}

// No sparsification, no election, no per-element divisor: linear_body computes the same values.
inline bool linear_merge(const Config& c, const Model* models) {
  if (c.consensus != merge::kConsensusNone) return false;
  if (c.normalize == merge::kAgreeWeight || c.normalize == merge::kAgreeCount) return false;
  for (int32_t i = 0; i < c.k; ++i) {
    if (!models[i].keep_all) return false;
  }
  return true;
}

#define PYFUSE_MERGE_CLONES(suffix, dtype)                                                                     \
  PYFUSE_CLONES int64_t band_##suffix(const void* x, const void* base, int64_t begin, int64_t len,            \
                                      const BandSpec& sp, uint32_t* key, uint8_t* flag, BandCounts* counts) {   \
    return band_body<dtype>(x, base, begin, len, sp, key, flag, counts);                                        \
  }                                                                                                             \
  PYFUSE_CLONES void fused_##suffix(const Config& c, const void* const* x, const Model* m, int64_t start,       \
                                    int64_t len, int64_t stride, Scratch& s) {                                  \
    if (linear_merge(c, m)) return linear_body<dtype>(c, x, m, start, len, s);                                  \
    fused_body<dtype>(c, x, m, start, len, stride, s);                                                          \
  }                                                                                                             \
  PYFUSE_CLONES void l1_##suffix(const Config& c, const void* const* x, const Model* m, int64_t start, int64_t len, \
                                 Scratch& s, double* sums) {                                                    \
    l1_body<dtype>(c, x, m, start, len, s, sums);                                                               \
  }
PYFUSE_MERGE_CLONES(f32, kFloat32)
PYFUSE_MERGE_CLONES(f16, kFloat16)
PYFUSE_MERGE_CLONES(bf16, kBFloat16)
#undef PYFUSE_MERGE_CLONES

// (t, b) form of a select.h threshold: ties at t are kept up to flat index b (exclusive).
template <class KeyFn>
void top_set(int64_t n, int64_t k, KeyFn key_of, uint32_t* t, int64_t* b) {
  const select::Threshold th = select::select_threshold<31>(n, k, key_of);
  *t = th.key;
  *b = k <= 0 ? 0 : INT64_MAX;
  if (!th.split()) return;
  // Only the last chunk whose earlier ties leave it a positive quota keeps part of its ties.
  int64_t c = select::num_chunks(n) - 1;
  while (th.equal_before[c] >= th.equal_kept) --c;
  int64_t need = th.equal_kept - th.equal_before[c];
  for (int64_t i = c * select::kChunk;; ++i) {
    if (key_of(i) == th.key && --need == 0) {
      *b = i + 1;
      return;
    }
  }
}

// The band step of one block [begin, begin + len) of fixed chunk cbegin for one job: appends the elements with
// lo <= |x - base| < hi to c (offsets in the chunk), returns how many keys are >= hi.
using BandFn = void (*)(const void* x, const void* base, int64_t begin, int64_t len, int64_t cbegin, const BandSpec& sp,
                        BandCandidates& c, BandCounts& counts);
constexpr int64_t kBandBlock = 4096;  // a block of base and of every model's keys and flags stays in L1

template <int32_t kDtype, int64_t (*kFlags)(const void*, const void*, int64_t, int64_t, const BandSpec&, uint32_t*,
                                            uint8_t*, BandCounts*)>
void band_portable(const void* x, const void* base, int64_t begin, int64_t len, int64_t cbegin, const BandSpec& sp,
                   BandCandidates& c, BandCounts& counts) {
  alignas(64) uint32_t key[kBandBlock];
  alignas(64) uint8_t flag[kBandBlock];
  if (kFlags(x, base, begin, len, sp, key, flag, &counts) != 0) {
    select::for_each_flagged(flag, len, [&](int64_t j) { c.push(key[j], begin + j - cbegin); });
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// band_portable's result with AVX-512 (band_candidates.h): the same keys (the same float subtraction), no key
// or flag arrays.
template <int32_t kDtype>
void band_avx512(const void* x, const void* base, int64_t begin, int64_t len, int64_t cbegin, const BandSpec& sp,
                 BandCandidates& c, BandCounts& counts) {
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int32_t>(sp.lo));
  const __m512i hi_v = _mm512_set1_epi32(static_cast<int32_t>(sp.hi));
  const __m512i h0_v = _mm512_set1_epi32(static_cast<int32_t>(sp.heavy[0]));
  const __m512i h1_v = _mm512_set1_epi32(static_cast<int32_t>(sp.heavy[1]));
  const __m512i abs_v = _mm512_set1_epi32(0x7fffffff), step = _mm512_set1_epi32(16);
  __m512i offset = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(begin - cbegin)),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const bool heavy = sp.heavy[0] != kNoKey;
  int64_t above = 0, eq0 = 0, eq1 = 0, j = 0;
  for (; j + 16 <= len; j += 16, offset = _mm512_add_epi32(offset, step)) {
    const __m512 b = base == nullptr ? _mm512_setzero_ps() : load16<kDtype>(base, begin + j);
    const __m512i key = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(load16<kDtype>(x, begin + j), b)), abs_v);
    __mmask16 skip = 0;
    if (heavy) {
      const __mmask16 e0 = _mm512_cmpeq_epi32_mask(key, h0_v), e1 = _mm512_cmpeq_epi32_mask(key, h1_v);
      eq0 += __builtin_popcount(e0);
      eq1 += __builtin_popcount(e1);
      skip = _kor_mask16(e0, e1);
    }
    above += collect_band16(key, offset, lo_v, hi_v, c, skip);
  }
  const auto key_of = magnitude_keys<kDtype>(x, base);
  for (; j < len; ++j) {
    const uint32_t key = key_of(begin + j);
    above += key >= sp.hi;
    eq0 += key == sp.heavy[0];
    eq1 += key == sp.heavy[1];
    if (key >= sp.lo && key < sp.hi && key != sp.heavy[0] && key != sp.heavy[1]) c.push(key, begin + j - cbegin);
  }
  counts.above += above;
  counts.heavy[0] += eq0;
  counts.heavy[1] += eq1;
}

#pragma GCC pop_options

template <int32_t kDtype>
BandFn band_step() {
  if (avx512_paths_usable()) return band_avx512<kDtype>;
  if constexpr (kDtype == kFloat32) return band_portable<kDtype, band_f32>;
  if constexpr (kDtype == kFloat16) return band_portable<kDtype, band_f16>;
  return band_portable<kDtype, band_bf16>;
}

// Candidate offsets inside one fixed chunk fit 16 bits.
static_assert(select::kChunk <= 65536, "chunk offsets are stored as uint16");

// One exact top-k set of |x_i - base| (a model's kept or dropped set), resolved by band_top_sets.
struct TopJob {
  const void* x;
  int64_t k;
  uint32_t* t;  // the (t, b) form of the set, as top_set gives it
  int64_t* b;
  select::Band band;
  BandSpec spec;
  std::vector<BandCandidates> cand;  // per fixed chunk: the band's elements but the heavy keys
  std::vector<BandCounts> counts;    // per fixed chunk: keys >= band.hi, and of each heavy key
};

// The threshold of a job whose band sweep is done: exact selection among the band's candidates and heavy keys,
// or top_set (two or three more reads) when the band missed the k-th key.
template <int32_t kDtype>
void finish_job(const Config& c, TopJob& job) {
  const int64_t chunks = select::num_chunks(c.n);
  int64_t above = 0, m = 0, heavy[2] = {0, 0};
  for (int64_t ch = 0; ch < chunks; ++ch) {
    above += job.counts[ch].above;
    m += job.cand[ch].count;
    for (int h = 0; h < 2; ++h) heavy[h] += job.counts[ch].heavy[h];
  }
  const auto key_of = magnitude_keys<kDtype>(job.x, c.base);
  if (above >= job.k || above + m + heavy[0] + heavy[1] < job.k) return top_set(c.n, job.k, key_of, job.t, job.b);
  const std::vector<uint32_t> all = keys_in_order(job.cand);
  const int extras = job.spec.heavy[0] == kNoKey ? 0 : job.spec.heavy[1] == kNoKey ? 1 : 2;
  const select::Threshold th = select::select_in_band(
      m, job.k - above, job.spec.lo, job.spec.hi, [&all](int64_t j) { return all[j]; }, job.spec.heavy, heavy, extras);
  *job.t = th.key;
  *job.b = INT64_MAX;
  if (th.equal_kept == th.equal_total) return;
  int64_t need = th.equal_kept;  // the tie bound: one past the equal_kept-th element whose key is t
  for (int h = 0; h < extras; ++h) {
    if (th.key != job.spec.heavy[h]) continue;
    // A heavy key: its per-chunk counts give the chunk where the quota runs out; that chunk is scanned.
    int64_t ch = 0;
    while (need > job.counts[ch].heavy[h]) need -= job.counts[ch++].heavy[h];
    for (int64_t i = ch * select::kChunk;; ++i) {
      if (key_of(i) == th.key && --need == 0) {
        *job.b = i + 1;
        return;
      }
    }
  }
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const BandCandidates& cand = job.cand[ch];
    for (int64_t j = 0; j < cand.count; ++j) {
      if (cand.keys[j] == th.key && --need == 0) {
        *job.b = ch * select::kChunk + cand.offs[j] + 1;
        return;
      }
    }
  }
}

// top_set for every job in one read of the models and base: each job gets a sampled key band
// (select::sample_band) that holds its k-th largest key; one sweep over fixed chunks then counts, per job,
// the keys above the band and collects the band's keys with their offsets (so in flat order), every job of
// a block while that block of base (and of its model) is in L1; each threshold is then selected exactly
// among its candidates. Heavy ties (more candidates than 1/20 of the input's bytes) are met by counting the two
// most frequent keys of the band instead of storing them. A job falls back to top_set for small inputs, when
// its band misses, or when even then its candidates would not fit.
template <int32_t kDtype>
void band_top_sets(const Config& c, std::vector<TopJob>& jobs, BandFn band_fn) {
  constexpr int64_t kSampleMin = 1 << 18;  // below this a full histogram pass is cheap anyway
  const int64_t n = c.n, chunks = select::num_chunks(n);
  const int64_t fit = n * dtype_size(kDtype) / 20 / 10;  // 10 bytes per candidate, 2x reserve slack
  std::vector<TopJob*> banded;
  for (TopJob& job : jobs) {
    const auto key_of = magnitude_keys<kDtype>(job.x, c.base);
    if (job.k > 0 && job.k < n && n >= kSampleMin) job.band = select::sample_band<31>(n, job.k, key_of);
    job.spec = {job.band.lo, job.band.hi, {kNoKey, kNoKey}};
    int64_t stored = job.band.expected;
    if (job.band.hi != 0 && stored > fit) {  // crowded by ties? count the two most frequent keys instead
      const std::vector<select::HeavyKey> heavy = select::heavy_keys(n, job.band, key_of, 2);
      for (size_t h = 0; h < heavy.size(); ++h) {
        job.spec.heavy[h] = heavy[h].key;
        stored -= heavy[h].expected;
      }
    }
    if (job.band.hi == 0 || stored > fit) {
      top_set(n, job.k, key_of, job.t, job.b);
      continue;
    }
    job.band.expected = stored;
    job.cand.resize(chunks);
    job.counts.assign(chunks, BandCounts{});
    banded.push_back(&job);
  }
  if (banded.empty()) return;
#pragma omp parallel for schedule(dynamic) if (chunks > 1)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t cbegin = ch * select::kChunk, cend = std::min(n, cbegin + select::kChunk);
    for (TopJob* job : banded) job->cand[ch].reserve(job->band.expected / chunks * 5 / 4 + 16);
    for (int64_t begin = cbegin; begin < cend; begin += kBandBlock) {
      const int64_t len = std::min(kBandBlock, cend - begin);
      for (TopJob* job : banded) band_fn(job->x, c.base, begin, len, cbegin, job->spec, job->cand[ch], job->counts[ch]);
    }
  }
  for (TopJob* job : banded) finish_job<kDtype>(c, *job);
}

template <int32_t kDtype>
void thresholds(const Config& c, const void* const* x, const int64_t* k_keep, const int64_t* k_drop, Model* models) {
  std::vector<TopJob> jobs;
  for (int32_t i = 0; i < c.k; ++i) {
    Model& m = models[i];
    if (m.keep_all) continue;
    jobs.push_back(TopJob{x[i], k_keep[i], &m.t_keep, &m.b_keep, {}, {}, {}, {}});
    jobs.push_back(TopJob{x[i], k_drop[i], &m.t_drop, &m.b_drop, {}, {}, {}, {}});
  }
  band_top_sets<kDtype>(c, jobs, band_step<kDtype>());
}

using FusedFn = void (*)(const Config&, const void* const*, const Model*, int64_t, int64_t, int64_t, Scratch&);
using L1Fn = void (*)(const Config&, const void* const*, const Model*, int64_t, int64_t, Scratch&, double*);

}  // namespace

// models[i] arrives with weight, scale, p_keep, p_span, keep_all set; the rest is filled here.
void merge_task_vectors(const Config& c, const void* const* x, Model* models, const int64_t* k_keep,
                        const int64_t* k_drop) {
  const bool by_row = c.sparsify == merge::kDella;
  const int64_t seg = by_row ? c.ncols : std::min<int64_t>(kTile, c.n);
  const int64_t nseg = (c.n + seg - 1) / seg;
  FusedFn fused = c.in_dtype == kFloat32 ? fused_f32 : c.in_dtype == kFloat16 ? fused_f16 : fused_bf16;
  L1Fn l1 = c.in_dtype == kFloat32 ? l1_f32 : c.in_dtype == kFloat16 ? l1_f16 : l1_bf16;

  for (int32_t i = 0; i < c.k; ++i) {
    models[i].t_keep = models[i].t_drop = UINT32_MAX;
    models[i].b_keep = models[i].b_drop = 0;
  }
  if (c.sparsify == merge::kMagnitude || c.sparsify == merge::kBreadcrumbs) {
    if (c.in_dtype == kFloat32) thresholds<kFloat32>(c, x, k_keep, k_drop, models);
    if (c.in_dtype == kFloat16) thresholds<kFloat16>(c, x, k_keep, k_drop, models);
    if (c.in_dtype == kBFloat16) thresholds<kBFloat16>(c, x, k_keep, k_drop, models);
  }
  // Random keep decisions recorded by the L1 pass for the fused pass: K x n bits, segment-major.
  const bool record = c.rescale == merge::kL1 && (c.sparsify == merge::kRandom || c.sparsify == merge::kDella);
  const int64_t seg_words = (seg + 63) / 64;
  std::vector<uint64_t> keep_bits(record ? static_cast<size_t>(nseg * c.k * seg_words) : 0);
  auto segment_bits = [&](int64_t g, bool replay) {
    KeepBits kb;
    if (record) kb = {&keep_bits[static_cast<size_t>(g * c.k * seg_words)], seg_words, replay};
    return kb;
  };
  if (c.rescale == merge::kL1) {
    std::vector<double> partial(nseg * c.k * 2 * kLanes);
#pragma omp parallel if (c.n >= kParallelMin)
    {
      Scratch s(1, seg);
#pragma omp for schedule(dynamic, 8)
      for (int64_t g = 0; g < nseg; ++g) {
        s.keep_bits = segment_bits(g, false);
        l1(c, x, models, g * seg, std::min(seg, c.n - g * seg), s, &partial[g * c.k * 2 * kLanes]);
      }
    }
    for (int32_t i = 0; i < c.k; ++i) {
      double before = 0.0, after = 0.0;
      for (int64_t g = 0; g < nseg; ++g) {
        for (int l = 0; l < kLanes; ++l) {
          before += partial[((g * c.k + i) * 2) * kLanes + l];
          after += partial[((g * c.k + i) * 2 + 1) * kLanes + l];
        }
      }
      models[i].scale = merge::l1_scale(before, after);
    }
  }
  for (int32_t i = 0; i < c.k; ++i) models[i].alpha = models[i].weight * models[i].scale;

  const int64_t per_chunk = std::max<int64_t>(8, kOutputChunk / (seg * dtype_size(c.out_dtype)));
#pragma omp parallel if (c.n >= kParallelMin)
  {
    Scratch s(c.k, seg);
#pragma omp for schedule(dynamic, per_chunk)
    for (int64_t g = 0; g < nseg; ++g) {
      s.keep_bits = segment_bits(g, true);
      fused(c, x, models, g * seg, std::min(seg, c.n - g * seg), seg, s);
    }
  }
}

}  // namespace cpu
}  // namespace pyfuse
