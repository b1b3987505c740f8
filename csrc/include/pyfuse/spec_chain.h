// Chain verification of speculative drafts (verify_greedy, rejection_sample, typical_accept): the
// per-request logic shared by the CPU and CUDA kernels. Vocabulary-wide reductions (argmax, softmax
// statistics, residual sums) are per backend; everything that decides which token is emitted lives here.
//
// Layouts. Padded: draft ids [B, K], target rows [B, K+1, V], draft rows [B, K, V]. Ragged: draft ids [T],
// cu [B+1] (leading 0), target rows [T+B, V] (each request's rows, then its bonus row), draft rows [T, V].
// The element offset of (request b, row i of that request) is b * sb + (row0 + i) * sk, where row0 = 0 in
// the padded layout (sb = batch stride) and row0 = cu[b] (+ b for target-layout tensors) in the ragged one
// (sb = 0). cu values are clamped so that any input stays in bounds.
#pragma once

#include <math.h>

#include "pyfuse/common.h"
#include "pyfuse/philox.h"

namespace pyfuse {
namespace spec {

enum Mode : int32_t { kGreedy = 0, kRejection = 1, kTypical = 2 };

// Philox counter word 3: separate streams for the accept test, the recovered token and the bonus token.
enum Purpose : uint32_t { kAcceptDraw = 1, kResidualDraw = 2, kBonusDraw = 3 };

// Residual / bonus sampling is an inverse CDF over fixed-point weights: integer sums are exact in any
// order, so every backend picks the same token from the same uniform. Weights are clamped to [0, 1] and
// scaled by 2^40 (resolution 9e-13; a sum over V < 2^23 entries fits in int64).
constexpr float kFixedScale = 1099511627776.0f;  // 2^40

constexpr int32_t kPlaceholder = -1;

struct ChainArgs {
  int32_t mode;
  int64_t batch, vocab, width;  // B, V, output columns (max_draft_len + 1)
  int64_t num_draft;            // padded: K; ragged: T
  const void* cu;               // null: padded layout
  int32_t cu_is64;
  const void* ids;
  int32_t ids_is64;
  int64_t ids_sb, ids_sk;
  const void* target;
  int32_t target_dtype, target_logits;
  int64_t target_sb, target_sk;
  const void* draft;  // null: one-hot draft (the draft token has probability 1)
  int32_t draft_dtype, draft_logits;
  int64_t draft_sb, draft_sk;
  float temperature;              // logits rows: softmax(logits / temperature)
  const float* uniforms;          // null: Philox; else [2, target rows] (accept plane, sample plane)
  int64_t uniforms_plane, uniforms_sb, uniforms_sk;
  uint64_t seed;                  // used when seeds is null: key = seed, Philox stream = b
  const int64_t* seeds;           // [B] per-request keys, stream 0: batch-invariant
  float typical_eps, typical_delta;
  int32_t* out_tokens;            // [B, width]
  int32_t* out_num;               // [B]
};

// The flat argument list of the bindings (pointers as integers, 0 = null), in ChainArgs order; one list
// for the CPU and CUDA modules.
#define PYFUSE_SPEC_CHAIN_PARAMS                                                                           \
  int32_t mode, int64_t batch, int64_t vocab, int64_t width, int64_t num_draft, uintptr_t cu, int32_t cu_is64, \
      uintptr_t ids, int32_t ids_is64, int64_t ids_sb, int64_t ids_sk, uintptr_t target, int32_t target_dtype,  \
      int32_t target_logits, int64_t target_sb, int64_t target_sk, uintptr_t draft, int32_t draft_dtype,        \
      int32_t draft_logits, int64_t draft_sb, int64_t draft_sk, float temperature, uintptr_t uniforms,          \
      int64_t uniforms_plane, int64_t uniforms_sb, int64_t uniforms_sk, uint64_t seed, uintptr_t seeds,         \
      float typical_eps, float typical_delta, uintptr_t out_tokens, uintptr_t out_num

#define PYFUSE_SPEC_CHAIN_ARGS                                                                                   \
  ::pyfuse::spec::ChainArgs {                                                                                    \
    mode, batch, vocab, width, num_draft, reinterpret_cast<const void*>(cu), cu_is64,                            \
        reinterpret_cast<const void*>(ids), ids_is64, ids_sb, ids_sk, reinterpret_cast<const void*>(target),    \
        target_dtype, target_logits, target_sb, target_sk, reinterpret_cast<const void*>(draft), draft_dtype,   \
        draft_logits, draft_sb, draft_sk, temperature, reinterpret_cast<const float*>(uniforms), uniforms_plane, \
        uniforms_sb, uniforms_sk, seed, reinterpret_cast<const int64_t*>(seeds), typical_eps, typical_delta,    \
        reinterpret_cast<int32_t*>(out_tokens), reinterpret_cast<int32_t*>(out_num)                             \
  }

struct Span {
  int64_t draft_row;   // first draft row of the request
  int64_t target_row;  // first target row of the request
  int64_t count;       // number of draft tokens verified
};

PYFUSE_HD int64_t load_index(const void* p, int32_t is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

PYFUSE_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

PYFUSE_HD Span request_span(const ChainArgs& a, int64_t b) {
  Span s;
  if (a.cu == nullptr) {
    s.draft_row = 0;
    s.target_row = 0;
    s.count = a.num_draft < a.width - 1 ? a.num_draft : a.width - 1;
    return s;
  }
  const int64_t lo = clamp64(load_index(a.cu, a.cu_is64, b), 0, a.num_draft);
  const int64_t hi = clamp64(load_index(a.cu, a.cu_is64, b + 1), lo, a.num_draft);
  s.draft_row = lo;
  s.target_row = lo + b;
  s.count = hi - lo < a.width - 1 ? hi - lo : a.width - 1;
  return s;
}

PYFUSE_HD int64_t target_offset(const ChainArgs& a, int64_t b, const Span& s, int64_t i) {
  return b * a.target_sb + (s.target_row + i) * a.target_sk;
}

PYFUSE_HD int64_t draft_offset(const ChainArgs& a, int64_t b, const Span& s, int64_t i) {
  return b * a.draft_sb + (s.draft_row + i) * a.draft_sk;
}

// Draft token i of request b; -1 for an id outside [0, V) (never accepted, never read).
PYFUSE_HD int64_t draft_token(const ChainArgs& a, int64_t b, const Span& s, int64_t i) {
  const int64_t x = load_index(a.ids, a.ids_is64, b * a.ids_sb + (s.draft_row + i) * a.ids_sk);
  return (x >= 0 && x < a.vocab) ? x : -1;
}

// Uniform for (request b, position i): plane 0 = accept test, plane 1 = recovered / bonus token.
PYFUSE_HD float draw(const ChainArgs& a, int64_t b, const Span& s, int64_t i, int32_t plane, uint32_t purpose) {
  if (a.uniforms != nullptr) {
    return a.uniforms[plane * a.uniforms_plane + b * a.uniforms_sb + (s.target_row + i) * a.uniforms_sk];
  }
  const uint64_t key = a.seeds != nullptr ? static_cast<uint64_t>(a.seeds[b]) : a.seed;
  const uint32_t stream = a.seeds != nullptr ? 0u : static_cast<uint32_t>(b);
  return philox::uniform(key, static_cast<uint64_t>(i), stream, purpose);
}

// Leviathan/Chen accept test min(1, p/q) > u without a division; u = 0 with p = 0 rejects.
PYFUSE_HD bool accept_ratio(float u, float p, float q) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(u, q) < p;
#else
  return u * q < p;
#endif
}

// Medusa's typical acceptance: p(x) > min(eps, delta * exp(-H)).
PYFUSE_HD bool accept_typical(float p, float entropy, float eps, float delta) {
  const float t = delta * expf(-entropy);
  return p > (eps < t ? eps : t);
}

PYFUSE_HD int64_t fixed_weight(float w) {
  w = w > 0.0f ? (w < 1.0f ? w : 1.0f) : 0.0f;  // NaN -> 0
  return static_cast<int64_t>(w * kFixedScale);
}

// Inverse-CDF threshold in [0, total): the token is the first index whose inclusive prefix sum exceeds it.
PYFUSE_HD int64_t sample_threshold(float u, int64_t total) {
  if (!(u >= 0.0f && u < 1.0f)) u = 0.0f;  // injected garbage (validate=False) still gives an in-range id
#if defined(__CUDA_ARCH__)
  const double t = __dmul_rn(static_cast<double>(u), static_cast<double>(total));
#else
  const double t = static_cast<double>(u) * static_cast<double>(total);
#endif
  const int64_t thr = static_cast<int64_t>(t);
  return thr < total ? thr : total - 1;
}

// softmax(l / T) element with the row's max m and normaliser s = sum exp((l - m) / T).
PYFUSE_HD float softmax_prob(float l, float m, float s, float temperature) {
  return expf((l - m) / temperature) / s;
}

// Writes request b's output row: accepted draft ids, the final token, then placeholders.
PYFUSE_HD void write_request(const ChainArgs& a, int64_t b, const Span& s, int64_t accepted, int64_t final_token) {
  int32_t* out = a.out_tokens + b * a.width;
  for (int64_t i = 0; i < a.width; ++i) {
    int32_t v = kPlaceholder;
    if (i < accepted) {
      v = static_cast<int32_t>(draft_token(a, b, s, i));
    } else if (i == accepted) {
      v = static_cast<int32_t>(final_token);
    }
    out[i] = v;
  }
  a.out_num[b] = static_cast<int32_t>(accepted);
}

// One probability row, stored as probabilities or as logits (softmax(l / T) computed on the fly from the
// row max m and normaliser s, which the backend's reduction fills in).
struct ProbRow {
  const void* ptr;
  int32_t dtype;
  int32_t logits;
  float temperature;
  int64_t off;
  float m, s;

  PYFUSE_HD float raw(int64_t j) const { return load_float(ptr, dtype, off + j); }
  PYFUSE_HD float prob(int64_t j) const { return logits ? softmax_prob(raw(j), m, s, temperature) : raw(j); }
};

// Sampling weight of token j in max(0, p - q); q is the draft row, or one-hot at x when null (x = -1: q = 0).
PYFUSE_HD int64_t residual_weight(const ProbRow& p, const ProbRow* q, int64_t x, int64_t j) {
  return fixed_weight(p.prob(j) - (q != nullptr ? q->prob(j) : (j == x ? 1.0f : 0.0f)));
}

// Per-request decisions of every mode. R is the backend's vocabulary-wide reduction (sequential on the
// CPU, block-collective on CUDA: every thread then runs this code in lockstep with identical results):
//   ProbRow row(ptr, dtype, logits, off)       the row with its softmax statistics filled in
//   int64_t argmax(row)                        lowest index of the max of row.raw (NaN never wins)
//   float entropy(row)                         -sum p log p over p > 0
//   int64_t inverse_cdf(p, q, x, u)            first j whose inclusive prefix sum of
//                                              residual_weight(p, q, x, j) exceeds sample_threshold(u, total);
//                                              -1 when total == 0
template <class R>
struct ChainOps {
  const ChainArgs& a;
  R& r;

  PYFUSE_HD ProbRow target_row(int64_t b, const Span& s, int64_t i) {
    return r.row(a.target, a.target_dtype, a.target_logits, target_offset(a, b, s, i));
  }
  PYFUSE_HD ProbRow draft_row(int64_t b, const Span& s, int64_t i) {
    return r.row(a.draft, a.draft_dtype, a.draft_logits, draft_offset(a, b, s, i));
  }

  // Draft token x (a valid id) at position i.
  PYFUSE_HD bool accept(int64_t b, const Span& s, int64_t i, int64_t x) {
    const ProbRow p = target_row(b, s, i);
    if (a.mode == kGreedy) return x == r.argmax(p);
    if (a.mode == kTypical) return accept_typical(p.prob(x), r.entropy(p), a.typical_eps, a.typical_delta);
    const float q = a.draft != nullptr ? draft_row(b, s, i).prob(x) : 1.0f;
    return accept_ratio(draw(a, b, s, i, 0, kAcceptDraw), p.prob(x), q);
  }

  // Token emitted at position i: x is the rejected draft id (-1 when invalid or at the bonus row).
  PYFUSE_HD int64_t final_token(int64_t b, const Span& s, int64_t i, int64_t x) {
    const ProbRow p = target_row(b, s, i);
    if (a.mode != kRejection) return r.argmax(p);
    int64_t tok;
    if (i < s.count) {  // recovered token from normalised max(0, p - q); q one-hot at x without draft rows
      const float u = draw(a, b, s, i, 1, kResidualDraw);
      ProbRow q = p;
      if (a.draft != nullptr) q = draft_row(b, s, i);
      tok = r.inverse_cdf(p, a.draft != nullptr ? &q : nullptr, x, u);
      if (tok < 0) tok = r.inverse_cdf(p, nullptr, -1, u);  // p <= q everywhere: fall back to p
    } else {
      tok = r.inverse_cdf(p, nullptr, -1, draw(a, b, s, i, 1, kBonusDraw));
    }
    return tok < 0 ? a.vocab - 1 : tok;
  }
};

// The accept loop: accepted prefix, then the final token; the writer stores the request's output row.
template <class R>
PYFUSE_HD void verify_request(const ChainArgs& a, int64_t b, R& reducer, bool writer) {
  ChainOps<R> ops{a, reducer};
  const Span s = request_span(a, b);
  int64_t i = 0;
  int64_t rejected = -1;
  for (; i < s.count; ++i) {
    const int64_t x = draft_token(a, b, s, i);
    if (x < 0 || !ops.accept(b, s, i, x)) {
      rejected = x;
      break;
    }
  }
  const int64_t tok = ops.final_token(b, s, i, rejected);
  if (writer) write_request(a, b, s, i, tok);
}

}  // namespace spec

namespace cpu {
void spec_chain_verify(const spec::ChainArgs& args);
}
namespace cuda {
void spec_chain_verify(const spec::ChainArgs& args, uintptr_t stream);
}

}  // namespace pyfuse
