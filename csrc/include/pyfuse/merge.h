// Per-element math of pyfuse::merge_task_vectors, shared by the CPU and CUDA kernels (the specification
// is pyfuse/reference/merge.py). Branch-free on integer bit masks so that the CPU loops vectorize; float
// steps are explicitly rounded (no FMA) so that every backend makes the same keep decisions and, with
// the same model order, computes the same values.
#pragma once

#include "pyfuse/common.h"
#include "pyfuse/philox.h"

namespace pyfuse {
namespace merge {

// Codes must match pyfuse/merge/op.py (tuples SPARSIFY, RESCALE, CONSENSUS, NORMALIZE).
enum Sparsify : int32_t { kSparsifyNone = 0, kMagnitude = 1, kRandom = 2, kBreadcrumbs = 3, kDella = 4 };
enum Rescale : int32_t { kRescaleNone = 0, kInverseDensity = 1, kL1 = 2 };
enum Consensus : int32_t { kConsensusNone = 0, kSum = 1, kCount = 2 };
enum Normalize : int32_t { kNormalizeNone = 0, kAgreeWeight = 1, kAgreeCount = 2, kAllWeight = 3 };

// One task vector's parameters once the statistics pass has run.
struct Model {
  float weight;  // w_i (agree_weight divisor)
  float scale;   // c_i (rescale factor; the unweighted election input is c_i * m_i)
  float alpha;   // w_i * c_i
  float p_keep;  // random: keep iff u < p_keep; della: the lowest keep probability of a row
  float p_span;  // della: probability added from the lowest to the highest rank of a row
  uint32_t t_keep, t_drop;  // magnitude/breadcrumbs: top-k thresholds on |d| bits (kept set, dropped outliers)
  int64_t b_keep, b_drop;   // an element whose key equals a threshold is in its top set iff index < b
  int32_t keep_all;         // no sparsification for this model
};

// Everything but the per-model parameters.
struct Config {
  void* out;
  const void* base;  // nullptr: the models are task vectors
  int64_t n;         // elements per tensor
  int64_t ncols;     // della row length
  int32_t k;         // number of models
  int32_t in_dtype, out_dtype;
  int32_t sparsify, rescale, consensus, normalize;
  bool weighted;       // election on w_i c_i m_i (else on c_i m_i)
  float all_weight_q;  // the all_weight divisor, computed on the host
  float lam;
  uint64_t seed;
  uint32_t purpose;
};

PYFUSE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PYFUSE_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PYFUSE_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Magnitude order key: |d| as bits (NaN above +inf).
PYFUSE_HD uint32_t magnitude_key(float d) { return float_bits(d) & 0x7fffffffu; }

// 1 iff the element is in the top set of threshold (t, b): larger key, or equal key at an index below b.
PYFUSE_HD uint32_t in_top(uint32_t key, int64_t i, uint32_t t, int64_t b) {
  return static_cast<uint32_t>(key > t) | (static_cast<uint32_t>(key == t) & static_cast<uint32_t>(i < b));
}

// Magnitude and breadcrumbs keep the t_keep top set minus the t_drop top set (empty for magnitude).
PYFUSE_HD uint32_t keep_top(const Model& m, uint32_t key, int64_t i) {
  return in_top(key, i, m.t_keep, m.b_keep) & (in_top(key, i, m.t_drop, m.b_drop) ^ 1u);
}

// DELLA keep probability of the element of 0-based ascending rank `rank` in a row of ncols.
PYFUSE_HD float della_prob(const Model& m, int64_t rank, int64_t ncols) {
  const float t = ncols > 1 ? div_rn(static_cast<float>(rank), static_cast<float>(ncols - 1)) : 0.0f;
  return add_rn(m.p_keep, mul_rn(t, m.p_span));
}

// Random keep: the packed Philox uniform of element i (word i % 4 of counter (i / 4, stream = model index,
// purpose)) is below p.
PYFUSE_HD uint32_t keep_random(uint64_t seed, int64_t i, uint32_t model, uint32_t purpose, float p) {
  return static_cast<uint32_t>(philox::packed_uniform(seed, static_cast<uint64_t>(i), model, purpose) < p);
}

// v where on == 1, +0 where on == 0 (bit-mask select).
PYFUSE_HD float select(float v, uint32_t on) { return bits_float(float_bits(v) & (0u - on)); }

// Sign election input of one model: the weighted v = alpha * m or the unweighted c * m.
PYFUSE_HD float election_input(const Model& m, float masked, bool weighted) {
  return mul_rn(weighted ? m.alpha : m.scale, masked);
}

// What a model adds to the election total: its input ("sum") or its sign ("count").
PYFUSE_HD float election_term(float e, int32_t consensus) {
  return consensus == kCount ? static_cast<float>(static_cast<int>(e > 0.0f) - static_cast<int>(e < 0.0f)) : e;
}

// Sign bit that turns agreeing election inputs positive: the elected sign is + iff total >= 0.
PYFUSE_HD uint32_t flip_of(float total) { return static_cast<uint32_t>(!(total >= 0.0f)) << 31; }

// 1 iff e has the elected sign; zeros never agree.
PYFUSE_HD uint32_t agrees(float e, uint32_t flip) {
  return static_cast<uint32_t>(bits_float(float_bits(e) ^ flip) > 0.0f);
}

// What an agreeing model adds to the per-element divisor.
PYFUSE_HD float divisor_term(const Model& m, int32_t normalize) { return normalize == kAgreeCount ? 1.0f : m.weight; }

// base + lam * acc / Q, with q the per-element agree sum (agree_*) or the host's all_weight divisor.
PYFUSE_HD float finish(float acc, float q, int32_t normalize, float lam, float base) {
  if (normalize == kAgreeWeight) acc = div_rn(acc, q == 0.0f ? 1.0f : q);
  if (normalize == kAgreeCount) acc = div_rn(acc, q < 1.0f ? 1.0f : q);
  if (normalize == kAllWeight) acc = div_rn(acc, q);
  return add_rn(base, mul_rn(acc, lam));
}

// L1 rescale factor from the sums of |d| and |m| (mergekit's 1e-7 guards).
PYFUSE_HD float l1_scale(double before, double after) {
  return (before < 1e-7 || after < 1e-7) ? 1.0f : static_cast<float>(before / after);
}

}  // namespace merge
}  // namespace pyfuse
