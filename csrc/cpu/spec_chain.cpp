// Chain verification on the CPU: one request per OpenMP iteration; the decisions come from
// pyfuse/spec_chain.h, the row reductions here are sequential (fixed order).
#include <math.h>

#include "pyfuse/spec_chain.h"

namespace pyfuse {
namespace cpu {
namespace {

struct SequentialReducer {
  const spec::ChainArgs& a;

  spec::ProbRow row(const void* ptr, int32_t dtype, int32_t logits, int64_t off) const {
    spec::ProbRow r{ptr, dtype, logits, a.temperature, off, 0.0f, 1.0f};
    if (!logits) return r;
    float m = -INFINITY;
    for (int64_t j = 0; j < a.vocab; ++j) {
      const float l = r.raw(j);
      m = l > m ? l : m;
    }
    float s = 0.0f;
    for (int64_t j = 0; j < a.vocab; ++j) s += expf((r.raw(j) - m) / a.temperature);
    r.m = m;
    r.s = s;
    return r;
  }

  int64_t argmax(const spec::ProbRow& r) const {
    float best = -INFINITY;
    int64_t idx = 0;
    for (int64_t j = 0; j < a.vocab; ++j) {
      const float v = r.raw(j);
      if (v > best) {
        best = v;
        idx = j;
      }
    }
    return idx;
  }

  float entropy(const spec::ProbRow& r) const {
    float h = 0.0f;
    for (int64_t j = 0; j < a.vocab; ++j) {
      const float p = r.prob(j);
      if (p > 0.0f) h -= p * logf(p);
    }
    return h;
  }

  template <class Weight>
  int64_t inverse_cdf(const Weight& weight, float u) const {
    int64_t total = 0;
    for (int64_t j = 0; j < a.vocab; ++j) total += weight(j);
    if (total == 0) return -1;
    const int64_t thr = spec::sample_threshold(u, total);
    int64_t c = 0;
    for (int64_t j = 0; j < a.vocab; ++j) {
      c += weight(j);
      if (c > thr) return j;
    }
    return a.vocab - 1;
  }
};

}  // namespace

void spec_chain_verify(const spec::ChainArgs& args) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < args.batch; ++b) {
    SequentialReducer reducer{args};
    spec::verify_request(args, b, reducer, true);
  }
}

}  // namespace cpu
}  // namespace pyfuse
