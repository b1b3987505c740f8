// Tree verification on the CPU: one batch row per OpenMP iteration, the walk from pyfuse/spec_tree.h with
// serial passes over the vocabulary. Weights are materialised a block at a time in a small stack buffer so
// that every step (fixed-point conversion, residual steps, argmax lanes) runs as a vectorised loop; integer
// sums keep the result independent of that blocking.
#include "pyfuse/spec_tree.h"

#define PYFUSE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

namespace pyfuse {
namespace spec_tree {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 512;

// load_float with the dtype known at compile time, so the loops below inline it and vectorise.
template <int32_t DT>
inline float load_as(const void* row, int64_t i) {
  if constexpr (DT == kFloat32) {
    return static_cast<const float*>(row)[i];
  } else if constexpr (DT == kFloat16) {
    return fp16_to_float(static_cast<const uint16_t*>(row)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
  }
}

template <int32_t DT>
PYFUSE_CLONES void load_weights(const void* row, int64_t begin, int64_t n, int64_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = weight(load_as<DT>(row, begin + j));
}

void load_weights(const void* row, int32_t dtype, int64_t begin, int64_t n, int64_t* out) {
  if (dtype == kFloat32) return load_weights<kFloat32>(row, begin, n, out);
  if (dtype == kFloat16) return load_weights<kFloat16>(row, begin, n, out);
  return load_weights<kBFloat16>(row, begin, n, out);
}

PYFUSE_CLONES void residual_steps(int64_t* w, const int64_t* wq, int64_t n, const double* inv, int64_t steps,
                                  double q_inv) {
  for (int64_t k = 0; k < steps; ++k) {
    for (int64_t j = 0; j < n; ++j) w[j] = residual_step(w[j], inv[k], wq[j], q_inv);
  }
}

PYFUSE_CLONES int64_t block_sum(const int64_t* w, int64_t n) {
  int64_t s = 0;
  for (int64_t j = 0; j < n; ++j) s += w[j];
  return s;
}

// Weights::operator() over tokens [begin, begin + n), n <= kBlock.
void block_weights(const Weights& w, int64_t begin, int64_t n, int64_t* out) {
  load_weights(w.p, w.dtype, begin, n, out);
  if (w.steps > 0) {
    int64_t wq[kBlock];
    load_weights(w.q, w.dtype, begin, n, wq);
    residual_steps(out, wq, n, w.inv_totals, w.steps, w.q_inv);
  }
  if (w.excluded >= 0) {
    int64_t c = w.first[w.excluded];
    for (int64_t count = 1; c > 0 && c < w.n; ++count) {  // Row::first_child / next_child bounds
      const int64_t x = w.cand[c];
      if (x >= begin && x < begin + n) out[x - begin] = 0;
      if (count >= w.n - 1) break;
      c = w.sibling[c];
    }
  }
}

// First index of the maximum, NaN never wins, 0 when no value beats -inf. Each lane keeps its first maximum
// (strict >); lanes merge by value, then lowest index: the answer of one sequential scan.
template <int32_t DT>
PYFUSE_CLONES int64_t argmax(const void* row, int64_t vocab) {
  float best[kLanes];
  int64_t at[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    best[l] = -__builtin_inff();
    at[l] = 0;
  }
  int64_t x = 0;
  for (; x + kLanes <= vocab; x += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = load_as<DT>(row, x + l);
      const bool take = v > best[l];
      best[l] = take ? v : best[l];
      at[l] = take ? x + l : at[l];
    }
  }
  for (int l = 0; x + l < vocab; ++l) {
    const float v = load_as<DT>(row, x + l);
    if (v > best[l]) {
      best[l] = v;
      at[l] = x + l;
    }
  }
  float m = -__builtin_inff();
  int64_t idx = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (best[l] > m || (best[l] == m && m > -__builtin_inff() && at[l] < idx)) {
      m = best[l];
      idx = at[l];
    }
  }
  return idx;
}

struct SerialVocab {
  int64_t vocab;
  int32_t dtype;

  bool leader() const { return true; }
  void sync() const {}

  int64_t argmax(const void* row) const {
    if (dtype == kFloat32) return spec_tree::argmax<kFloat32>(row, vocab);
    if (dtype == kFloat16) return spec_tree::argmax<kFloat16>(row, vocab);
    return spec_tree::argmax<kBFloat16>(row, vocab);
  }

  int64_t sum(const Weights& w) const {
    int64_t buf[kBlock];
    int64_t s = 0;
    for (int64_t begin = 0; begin < vocab; begin += kBlock) {
      const int64_t n = vocab - begin < kBlock ? vocab - begin : kBlock;
      block_weights(w, begin, n, buf);
      s += block_sum(buf, n);
    }
    return s;
  }

  int64_t sample(const Weights& w, double threshold) const {
    int64_t buf[kBlock];
    int64_t cum = 0;
    for (int64_t begin = 0; begin < vocab; begin += kBlock) {
      const int64_t n = vocab - begin < kBlock ? vocab - begin : kBlock;
      block_weights(w, begin, n, buf);
      const int64_t block = block_sum(buf, n);
      if (!(static_cast<double>(cum + block) > threshold)) {
        cum += block;
        continue;
      }
      for (int64_t j = 0; j < n; ++j) {
        cum += buf[j];
        if (static_cast<double>(cum) > threshold) return begin + j;
      }
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
