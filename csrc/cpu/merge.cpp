// pyfuse::merge_task_vectors on the CPU (OpenMP).
//
// Statistics pass, per model: exact top-k thresholds of |x_i - base| for magnitude/breadcrumbs
// (cpu/select.h, keys computed on the fly), then the L1 sums of d_i and of its masked version for
// rescale="l1". Fused pass: each thread takes a segment (a tile, or one row for della), recomputes every
// delta, mask and random number into a K x segment scratch, elects the sign, combines and writes the
// output once. Extra memory: per thread K x segment floats (+ della's row sort); no K x n buffers.
// Results do not depend on the thread count: per-element math only, L1 partial sums in fixed segments.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/select.h"
#include "pyfuse/merge.h"

// Runtime dispatch: one build, widest vectors the CPU has (never -march=native).
#define PYFUSE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define PYFUSE_INLINE __attribute__((always_inline)) inline

namespace pyfuse {
namespace cpu {
namespace {

using merge::Config;
using merge::Model;

constexpr int64_t kTile = 2048;  // fused-pass segment (K x kTile floats of scratch per thread)
constexpr int kLanes = 8;        // L1 partial sums: fixed lanes, so the order does not depend on the ISA

template <int32_t kDtype>
PYFUSE_INLINE float load(const void* p, int64_t i) {
  if constexpr (kDtype == kFloat32) return static_cast<const float*>(p)[i];
  if constexpr (kDtype == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
}

struct Scratch {
  std::vector<float> base, masked, total, acc, q, res;
  std::vector<uint32_t> flip, keys, order, tmp, rank;
  Scratch(int64_t k, int64_t seg)
      : base(seg), masked(k * seg), total(seg), acc(seg), q(seg), res(seg), flip(seg) {}
};

// Ascending ranks of keys[0, len) with ties to the lower index: LSD radix sort (stable) of the indices.
void stable_ranks(Scratch& s, int64_t len) {
  s.order.resize(len);
  s.tmp.resize(len);
  s.rank.resize(len);
  for (int64_t j = 0; j < len; ++j) s.order[j] = static_cast<uint32_t>(j);
  for (int shift = 0; shift < 31; shift += 8) {  // 8-bit digits: cheap bucket scans for short rows
    int64_t count[257] = {0};
    for (int64_t j = 0; j < len; ++j) ++count[((s.keys[j] >> shift) & 255u) + 1];
    if (count[((s.keys[0] >> shift) & 255u) + 1] == len) continue;  // one digit value: order unchanged
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (int64_t j = 0; j < len; ++j) s.tmp[count[(s.keys[s.order[j]] >> shift) & 255u]++] = s.order[j];
    s.order.swap(s.tmp);
  }
  for (int64_t p = 0; p < len; ++p) s.rank[s.order[p]] = static_cast<uint32_t>(p);
}

// masked[j] = m_i at element start + j: the delta where sparsification keeps it, else 0.
template <int32_t kDtype>
PYFUSE_INLINE void masked_segment(const Config& c, const void* x, const Model& m, uint32_t mi, int64_t start,
                                  int64_t len, Scratch& s, float* masked) {
  const float* bt = s.base.data();
  for (int64_t j = 0; j < len; ++j) masked[j] = load<kDtype>(x, start + j) - bt[j];
  if (m.keep_all) return;
  if (c.sparsify == merge::kMagnitude || c.sparsify == merge::kBreadcrumbs) {
    for (int64_t j = 0; j < len; ++j) {
      masked[j] = merge::select(masked[j], merge::keep_top(m, merge::magnitude_key(masked[j]), start + j));
    }
  } else if (c.sparsify == merge::kRandom) {
    for (int64_t j = 0; j < len; ++j) {
      masked[j] = merge::select(masked[j], merge::keep_random(c.seed, start + j, mi, c.purpose, m.p_keep));
    }
  } else if (c.sparsify == merge::kDella) {  // the segment is one row
    s.keys.resize(len);
    for (int64_t j = 0; j < len; ++j) s.keys[j] = merge::magnitude_key(masked[j]);
    stable_ranks(s, len);
    for (int64_t j = 0; j < len; ++j) {
      const float p = merge::della_prob(m, s.rank[j], len);
      masked[j] = merge::select(masked[j], merge::keep_random(c.seed, start + j, mi, c.purpose, p));
    }
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

// Fused pass over one segment: masks, election, combination, output.
template <int32_t kDtype>
PYFUSE_INLINE void fused_body(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                              int64_t stride, Scratch& s) {
  load_base<kDtype>(c, start, len, s);
  for (int32_t i = 0; i < c.k; ++i) masked_segment<kDtype>(c, x[i], models[i], i, start, len, s, &s.masked[i * stride]);
  float* total = s.total.data();
  uint32_t* flip = s.flip.data();
  float* acc = s.acc.data();
  float* q = s.q.data();
  std::fill(flip, flip + len, 0u);
  if (c.consensus != merge::kConsensusNone) {
    std::fill(total, total + len, 0.0f);
    for (int32_t i = 0; i < c.k; ++i) {
      const float* mk = &s.masked[i * stride];
      for (int64_t j = 0; j < len; ++j) {
        total[j] += merge::election_term(merge::election_input(models[i], mk[j], c.weighted), c.consensus);
      }
    }
    for (int64_t j = 0; j < len; ++j) flip[j] = merge::flip_of(total[j]);
  }
  std::fill(acc, acc + len, 0.0f);
  std::fill(q, q + len, c.normalize == merge::kAllWeight ? c.all_weight_q : 0.0f);
  const bool vote = c.consensus != merge::kConsensusNone;
  const bool agree_q = c.normalize == merge::kAgreeWeight || c.normalize == merge::kAgreeCount;
  for (int32_t i = 0; i < c.k; ++i) {
    const Model& m = models[i];
    const float* mk = &s.masked[i * stride];
    const float dq = merge::divisor_term(m, c.normalize);
    for (int64_t j = 0; j < len; ++j) {
      const float v = merge::mul_rn(m.alpha, mk[j]);
      const uint32_t a = vote ? merge::agrees(merge::election_input(m, mk[j], c.weighted), flip[j]) : 1u;
      acc[j] += merge::select(v, a);
      if (agree_q) q[j] += merge::select(dq, a);
    }
  }
  float* res = s.res.data();
  const float* bt = s.base.data();
  for (int64_t j = 0; j < len; ++j) res[j] = merge::finish(acc[j], q[j], c.normalize, c.lam, bt[j]);
  if (c.out_dtype == kFloat32) {
    float* out = static_cast<float*>(c.out) + start;
    for (int64_t j = 0; j < len; ++j) out[j] = res[j];
  } else {
    uint16_t* out = static_cast<uint16_t*>(c.out) + start;
    const bool half = c.out_dtype == kFloat16;
    for (int64_t j = 0; j < len; ++j) out[j] = half ? float_to_fp16(res[j]) : float_to_bf16(res[j]);
  }
}

// L1 statistics of one segment: lanes of sum |d| and sum |m| per model, sums[model][2][kLanes].
template <int32_t kDtype>
PYFUSE_INLINE void l1_body(const Config& c, const void* const* x, const Model* models, int64_t start, int64_t len,
                           Scratch& s, double* sums) {
  load_base<kDtype>(c, start, len, s);
  float* mk = s.masked.data();
  for (int32_t i = 0; i < c.k; ++i) {
    double before[kLanes] = {0}, after[kLanes] = {0};
    masked_segment<kDtype>(c, x[i], models[i], i, start, len, s, mk);
    for (int64_t j = 0; j < len; ++j) {
      before[j % kLanes] += static_cast<double>(std::abs(load<kDtype>(x[i], start + j) - s.base[j]));
      after[j % kLanes] += static_cast<double>(std::abs(mk[j]));
    }
    for (int l = 0; l < kLanes; ++l) {
      sums[(i * 2) * kLanes + l] = before[l];
      sums[(i * 2 + 1) * kLanes + l] = after[l];
    }
  }
}

#define PYFUSE_MERGE_CLONES(suffix, dtype)                                                                     \
  PYFUSE_CLONES void fused_##suffix(const Config& c, const void* const* x, const Model* m, int64_t start,       \
                                    int64_t len, int64_t stride, Scratch& s) {                                  \
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

template <int32_t kDtype>
void thresholds(const Config& c, const void* const* x, const int64_t* k_keep, const int64_t* k_drop, Model* models) {
  for (int32_t i = 0; i < c.k; ++i) {
    Model& m = models[i];
    if (m.keep_all) continue;
    const void* xi = x[i];
    const void* base = c.base;
    auto key_of = [xi, base](int64_t j) {
      const float b = base == nullptr ? 0.0f : load<kDtype>(base, j);
      return merge::magnitude_key(load<kDtype>(xi, j) - b);
    };
    top_set(c.n, k_keep[i], key_of, &m.t_keep, &m.b_keep);
    top_set(c.n, k_drop[i], key_of, &m.t_drop, &m.b_drop);
  }
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
  if (c.rescale == merge::kL1) {
    std::vector<double> partial(nseg * c.k * 2 * kLanes);
#pragma omp parallel if (nseg > 1)
    {
      Scratch s(1, seg);
#pragma omp for schedule(static)
      for (int64_t g = 0; g < nseg; ++g) {
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

#pragma omp parallel if (nseg > 1)
  {
    Scratch s(c.k, seg);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < nseg; ++g) fused(c, x, models, g * seg, std::min(seg, c.n - g * seg), seg, s);
  }
}

}  // namespace cpu
}  // namespace pyfuse
