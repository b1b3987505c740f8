// Row checks behind pyfuse.spec's validation (validate=True): one read of a probability or logit tensor,
// instead of one torch reduction per property. Each row is reduced by one thread in a fixed order
// (kLanes interleaved fp32 partial sums, combined pairwise), so the results do not depend on the thread
// count or on the instruction set target_clones picks.
#include <math.h>
#include <stdint.h>

#include <type_traits>
#include <vector>

#include "pyfuse/common.h"

namespace pyfuse {
namespace cpu {
namespace {

// Rows of a [n0, n1, vocab] tensor: element offset of row (i, k) is i * s0 + k * s1, the vocabulary unit-stride.
struct RowTensor {
  const void* ptr;
  int64_t n0, s0, n1, s1, vocab;
};

// 16 lanes as GCC vector types: one zmm, two ymm or four xmm registers depending on the target_clones
// pick, with the same lane-wise arithmetic (hence the same results) on each.
constexpr int kLanes = 16;
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

// Element type of a dtype code.
template <int DT>
using Elem = typename std::conditional<DT == kFloat32, float, uint16_t>::type;

// 16 elements from p[j..j+16), widened exactly to float32 (inline: vector types do not cross calls
// cheaply). float16 subnormals are scaled as integers: a float32 subnormal operand would take the slow
// microcode path.
template <int DT>
__attribute__((always_inline)) inline F16 widen(const void* p, int64_t j) {
  if (DT == kFloat32) {
    F16 v;
    __builtin_memcpy(&v, static_cast<const float*>(p) + j, sizeof v);
    return v;
  }
  H16 raw;
  __builtin_memcpy(&raw, static_cast<const uint16_t*>(p) + j, sizeof raw);
  const U16 h = __builtin_convertvector(raw, U16);
  if (DT == kBFloat16) return reinterpret_cast<F16>(h << 16);
  const U16 em = h & 0x7fffu;
  const U16 normal = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : (em << 13) + 0x38000000u;
  const F16 sub = __builtin_convertvector(reinterpret_cast<I16>(em), F16) * 0x1p-24f;
  const U16 mag = em < 0x400u ? reinterpret_cast<U16>(sub) : normal;
  return reinterpret_cast<F16>(mag | ((h & 0x8000u) << 16));
}

// Calls body(v, k) for each block of 16 elements of a row of n, k of them valid (the tail block is
// zero-filled after k).
template <int DT, class Body>
__attribute__((always_inline)) inline void for_blocks(const void* p, int64_t n, const Body& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) body(widen<DT>(p, j), kLanes);
  if (j < n) {
    Elem<DT> tail[kLanes] = {};
    for (int64_t i = j; i < n; ++i) tail[i - j] = static_cast<const Elem<DT>*>(p)[i];
    body(widen<DT>(tail, 0), static_cast<int>(n - j));
  }
}

constexpr I16 kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Probability row: sum (NaN / inf propagate; lanes combined pairwise, a fixed order) and min (NaN never
// wins; the sum already reports it). The zero-filled tail adds 0 to the sum and is kept out of the min.
template <int DT>
__attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
void prob_row(const void* p, int64_t n, float* sum, float* mn) {
  F16 s = {}, m = {};
  m += INFINITY;
  for_blocks<DT>(p, n, [&](const F16& v, int k) {
    s += v;
    m = (kLaneIndex < k) & (v < m) ? v : m;
  });
  float lo = m[0];
  for (int l = 1; l < kLanes; ++l) lo = m[l] < lo ? m[l] : lo;
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  *sum = s[0];
  *mn = lo;
}

// Logit row: the max, NaN when the row holds a NaN (tracked on the bits, so the max stays a compare-select).
template <int DT>
__attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
float logit_row(const void* p, int64_t n) {
  F16 m = {};
  m -= INFINITY;
  I16 nan = {};
  for_blocks<DT>(p, n, [&](const F16& v, int k) {
    m = (kLaneIndex < k) & (v > m) ? v : m;
    nan |= (reinterpret_cast<I16>(v) & 0x7fffffff) > 0x7f800000;
  });
  float hi = m[0];
  int32_t any = 0;
  for (int l = 0; l < kLanes; ++l) {
    hi = m[l] > hi ? m[l] : hi;
    any |= nan[l];
  }
  return any ? NAN : hi;
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
