// Row checks behind pyfuse.spec's validation (validate=True): one read of a probability or logit tensor,
// instead of one torch reduction per property. Each row is reduced by one thread in a fixed order
// (kLanes interleaved fp32 partial sums, combined pairwise), so the results do not depend on the thread
// count or on the instruction set target_clones picks.
#include <math.h>
#include <stdint.h>

#include <vector>

#include "pyfuse/common.h"
#include "spec_lanes.h"

namespace pyfuse {
namespace cpu {
namespace {

using lanes::F16;
using lanes::I16;
using lanes::for_blocks;
using lanes::kLaneIndex;
using lanes::kLanes;

// Rows of a [n0, n1, vocab] tensor: element offset of row (i, k) is i * s0 + k * s1, the vocabulary unit-stride.
struct RowTensor {
  const void* ptr;
  int64_t n0, s0, n1, s1, vocab;
};

// Probability row: sum (NaN / inf propagate; lanes combined pairwise, a fixed order) and min (NaN never
// wins; the sum already reports it). The zero-filled tail adds 0 to the sum and is kept out of the min.
template <int DT>
__attribute__((target_clones("avx512f", "avx2", "default")))
void prob_row(const void* p, int64_t n, float* sum, float* mn) {
  F16 s = {}, m = {};
  m += INFINITY;
  for_blocks<DT>(p, n, [&](const F16& v, int k) {
    s += v;
    m = (kLaneIndex < k) & (v < m) ? v : m;
  });
  float lo = m[0];
  for (int l = 1; l < kLanes; ++l) lo = m[l] < lo ? m[l] : lo;
  *sum = lanes::sum(s);
  *mn = lo;
}

// Logit row: the max, NaN when the row holds a NaN (tracked on the bits, so the max stays a compare-select).
template <int DT>
__attribute__((target_clones("avx512f", "avx2", "default")))
float logit_row(const void* p, int64_t n) {
  F16 m = {};
  m -= INFINITY;
  I16 nan = {};
  for_blocks<DT>(p, n, [&](const F16& v, int k) {
    m = (kLaneIndex < k) & (v > m) ? v : m;
    nan |= (reinterpret_cast<I16>(v) & 0x7fffffff) > 0x7f800000;
  });
  int32_t any = 0;
  for (int l = 0; l < kLanes; ++l) any |= nan[l];
  return any ? NAN : lanes::max(m);
}

template <int DT>
void rows(const RowTensor& t, bool logits, float* a, float* b) {
  const int64_t count = t.n0 * t.n1;
  // Small tensors stay on the calling thread: waking a second one costs more than the pass (and far more
  // on a loaded machine).
#pragma omp parallel for schedule(static) if (count * t.vocab >= (int64_t{1} << 20))
  for (int64_t r = 0; r < count; ++r) {
    const int64_t off = (r / t.n1) * t.s0 + (r % t.n1) * t.s1;
    const void* row = static_cast<const char*>(t.ptr) + off * dtype_size(DT);
    if (logits) {
      a[r] = logit_row<DT>(row, t.vocab);
    } else {
      prob_row<DT>(row, t.vocab, &a[r], &b[r]);
    }
  }
}

}  // namespace

// out = {worst, its row, min, its row}. Probabilities: worst |row sum - 1| and the smallest entry;
// logits: worst |row max| (NaN, +inf and all -inf rows make it non-finite), min unused. NaN beats
// everything; ties keep the first row.
void spec_check_rows(const void* p, int32_t dtype, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t vocab,
                     bool logits, double* out) {
  const RowTensor t{p, n0, s0, n1, s1, vocab};
  std::vector<float> a(n0 * n1), b(n0 * n1);
  if (dtype == kFloat32) {
    rows<kFloat32>(t, logits, a.data(), b.data());
  } else if (dtype == kFloat16) {
    rows<kFloat16>(t, logits, a.data(), b.data());
  } else {
    rows<kBFloat16>(t, logits, a.data(), b.data());
  }
  double worst = 0.0, lo = INFINITY;
  int64_t worst_row = 0, lo_row = 0;
  for (int64_t r = 0; r < n0 * n1; ++r) {
    const double d = fabs(logits ? static_cast<double>(a[r]) : static_cast<double>(a[r]) - 1.0);
    if (!isnan(worst) && (isnan(d) || d > worst)) {
      worst = d;
      worst_row = r;
    }
    if (!logits && b[r] < lo) {
      lo = b[r];
      lo_row = r;
    }
  }
  out[0] = worst;
  out[1] = static_cast<double>(worst_row);
  out[2] = lo;
  out[3] = static_cast<double>(lo_row);
}

}  // namespace cpu
}  // namespace pyfuse
