// Tree verification on the CPU: one batch row per OpenMP iteration, the walk from pyfuse/spec_tree.h with
// serial (fixed-order) passes over the vocabulary. Integer sums make the order irrelevant anyway.
#include "pyfuse/spec_tree.h"

namespace pyfuse {
namespace spec_tree {
namespace {

struct SerialVocab {
  int64_t vocab;
  int32_t dtype;

  bool leader() const { return true; }
  void sync() const {}

  int64_t argmax(const void* row) const {
    float best = -__builtin_inff();
    int64_t idx = 0;
    for (int64_t x = 0; x < vocab; ++x) {
      const float v = load_float(row, dtype, x);
      if (v > best) {  // NaN never wins; ties keep the lowest index
        best = v;
        idx = x;
      }
    }
    return idx;
  }

  int64_t sum(const Weights& w) const {
    int64_t s = 0;
    for (int64_t x = 0; x < vocab; ++x) s += w(x);
    return s;
  }

  int64_t sample(const Weights& w, double threshold) const {
    int64_t cum = 0;
    for (int64_t x = 0; x < vocab; ++x) {
      cum += w(x);
      if (static_cast<double>(cum) > threshold) return x;
    }
    return vocab - 1;  // only for an invalid injected uniform (>= 1 or NaN), as the reference
  }
};

}  // namespace

namespace cpu {

void verify_tree(const Batch& a) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < a.batch; ++b) {
    SerialVocab vocab = {a.vocab, a.dtype};
    walk(make_row(a, b), vocab);
  }
}

}  // namespace cpu
}  // namespace spec_tree
}  // namespace pyfuse
