// Chain verification on the CPU: one request per OpenMP iteration, the accept loop from
// pyfuse/spec_chain.h, and sequential (fixed-order) row reductions.
#include <math.h>

#include "pyfuse/spec_chain.h"

namespace pyfuse {
namespace cpu {
namespace {

using spec::ChainArgs;
using spec::Span;

// One probability row, stored as probabilities or as logits (softmax(l / T) computed on the fly).
struct Row {
  const void* ptr;
  int32_t dtype;
  bool logits;
  float temperature;
  int64_t off;
  int64_t vocab;
  float m = 0.0f, s = 1.0f;  // logits: row max and sum exp((l - m) / T)

  Row(const void* p, int32_t dt, bool lg, float t, int64_t o, int64_t v)
      : ptr(p), dtype(dt), logits(lg), temperature(t), off(o), vocab(v) {
    if (!logits) return;
    m = -INFINITY;
    for (int64_t j = 0; j < vocab; ++j) {
      const float l = raw(j);
      m = l > m ? l : m;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < vocab; ++j) sum += expf((raw(j) - m) / temperature);
    s = sum;
  }

  float raw(int64_t j) const { return load_float(ptr, dtype, off + j); }
  float prob(int64_t j) const { return logits ? spec::softmax_prob(raw(j), m, s, temperature) : raw(j); }

  // Lowest index of the maximum; NaN never wins, so the result is always in [0, V).
  int64_t argmax() const {
    float best = -INFINITY;
    int64_t idx = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const float v = raw(j);
      if (v > best) {
        best = v;
        idx = j;
      }
    }
    return idx;
  }

  float entropy() const {
    float h = 0.0f;
    for (int64_t j = 0; j < vocab; ++j) {
      const float p = prob(j);
      if (p > 0.0f) h -= p * logf(p);
    }
    return h;
  }
};

// Inverse CDF over fixed-point weights (see spec_chain.h); -1 when every weight is zero.
template <class Weight>
int64_t inverse_cdf(int64_t vocab, const Weight& weight, float u) {
  int64_t total = 0;
  for (int64_t j = 0; j < vocab; ++j) total += weight(j);
  if (total == 0) return -1;
  const int64_t thr = spec::sample_threshold(u, total);
  int64_t c = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    c += weight(j);
    if (c > thr) return j;
  }
  return vocab - 1;
}

struct CpuOps {
  const ChainArgs& a;

  Row target_row(int64_t b, const Span& s, int64_t i) const {
    return Row(a.target, a.target_dtype, a.target_logits != 0, a.temperature, spec::target_offset(a, b, s, i),
               a.vocab);
  }
  Row draft_row(int64_t b, const Span& s, int64_t i) const {
    return Row(a.draft, a.draft_dtype, a.draft_logits != 0, a.temperature, spec::draft_offset(a, b, s, i), a.vocab);
  }

  bool accept(int64_t b, const Span& s, int64_t i, int64_t x) const {
    const Row p = target_row(b, s, i);
    if (a.mode == spec::kGreedy) return x == p.argmax();
    if (a.mode == spec::kTypical) return spec::accept_typical(p.prob(x), p.entropy(), a.typical_eps, a.typical_delta);
    const float q = a.draft != nullptr ? draft_row(b, s, i).prob(x) : 1.0f;
    return spec::accept_ratio(spec::draw(a, b, s, i, 0, spec::kAcceptDraw), p.prob(x), q);
  }

  int64_t final_token(int64_t b, const Span& s, int64_t i, int64_t x) const {
    const Row p = target_row(b, s, i);
    if (a.mode != spec::kRejection) return p.argmax();
    const auto plain = [&](int64_t j) { return spec::fixed_weight(p.prob(j)); };
    int64_t tok = -1;
    if (i < s.count) {  // recovered token from normalised max(0, p - q); one-hot q when there is no draft row
      const float u = spec::draw(a, b, s, i, 1, spec::kResidualDraw);
      const Row q = a.draft != nullptr ? draft_row(b, s, i) : Row(nullptr, 0, false, 1.0f, 0, 0);
      const auto residual = [&](int64_t j) {
        return spec::fixed_weight(p.prob(j) - (a.draft != nullptr ? q.prob(j) : (j == x ? 1.0f : 0.0f)));
      };
      tok = inverse_cdf(a.vocab, residual, u);
      if (tok < 0) tok = inverse_cdf(a.vocab, plain, u);  // p <= q everywhere: fall back to p
    } else {
      tok = inverse_cdf(a.vocab, plain, spec::draw(a, b, s, i, 1, spec::kBonusDraw));
    }
    return tok < 0 ? a.vocab - 1 : tok;
  }
};

}  // namespace

void spec_chain_verify(const ChainArgs& args) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < args.batch; ++b) {
    CpuOps ops{args};
    spec::verify_request(args, b, ops, true);
  }
}

}  // namespace cpu
}  // namespace pyfuse
