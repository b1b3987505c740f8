// Tree verification (pyfuse.spec.verify_tree): the per-row walk shared by the CPU and CUDA kernels.
// pyfuse/reference/spec_tree.py is the specification; every step below mirrors it operation for operation
// (fixed-point int64 weights, single IEEE double operations) so the backends agree bit for bit.
//
// The walk is written once over a `Vocab` policy that performs the passes over the vocabulary: a serial
// loop on the CPU (one row per OpenMP thread), a block-wide reduction on CUDA (one row per block, every
// thread runs the same control flow and only the leader writes outputs).
#pragma once

#include "pyfuse/common.h"
#include "pyfuse/philox.h"

namespace pyfuse {
namespace spec_tree {

enum Mode : int32_t { kGreedy = 0, kTargetOnly = 1, kStochastic = 2 };

// Philox purposes (counter word 3): one coin per node, one final draw per row.
constexpr uint32_t kPurposeAccept = 0x74726561u;  // "trea"
constexpr uint32_t kPurposeFinal = 0x74726566u;   // "tref"

// trunc(clamp(p, 0, 1) * 2^32); NaN and negatives weigh 0.
PYFUSE_HD int64_t weight(float p) {
  if (!(p > 0.0f)) return 0;
  if (p > 1.0f) p = 1.0f;
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__fmul_rn(p, 4294967296.0f));
#else
  return static_cast<int64_t>(p * 4294967296.0f);
#endif
}

// 1 / total, or 0 for an empty distribution (whose scaled weights then all read 0). Distributions are
// normalised by multiplying with this reciprocal: one division per distribution, none per token (a double
// division in the per-token loops makes CUDA spill).
PYFUSE_HD double reciprocal(int64_t total) {
  if (total <= 0) return 0.0;
#if defined(__CUDA_ARCH__)
  return __drcp_rn(static_cast<double>(total));  // IEEE round-to-nearest, as 1.0 / x on the host
#else
  return 1.0 / static_cast<double>(total);
#endif
}

// One residual step: weight of max(w * inv - wq * q_inv, 0), re-quantised to 2^32.
PYFUSE_HD int64_t residual_step(int64_t w, double inv, int64_t wq, double q_inv) {
  double r = static_cast<double>(w) * inv - static_cast<double>(wq) * q_inv;
  if (!(r > 0.0)) r = 0.0;
  return static_cast<int64_t>(r * 4294967296.0);
}

// Everything the walk reads for one batch row; inputs are contiguous along the vocabulary.
struct Row {
  const int64_t* cand;     // [N]
  const int64_t* first;    // [N] first child
  const int64_t* sibling;  // [N] next sibling
  const char* target;      // row i at target + i * node_stride bytes
  const char* draft;       // same layout, or nullptr
  int64_t node_stride;     // bytes between the rows of consecutive nodes
  int32_t dtype;
  int64_t n;
  int64_t vocab;
  int32_t mode;
  int64_t max_depth;
  // Randomness: injected uniforms (u[N], u_final) or Philox(seed, index, stream, purpose).
  const float* u;
  const float* u_final;
  uint64_t seed;
  uint32_t stream;
  double* inv_totals;  // [N] scratch: reciprocal totals of the stochastic residuals
  // Outputs.
  int32_t* accept_index;  // [max_depth + 1]
  int32_t* token_ids;     // [max_depth + 1]
  int32_t* accept_len;
  int32_t* bonus;

  PYFUSE_HD const void* target_row(int64_t node) const { return target + node * node_stride; }
  PYFUSE_HD const void* draft_row(int64_t node) const { return draft + node * node_stride; }

  // Child list iteration with the reference's bounds: index outside [1, N) ends it, at most N - 1 entries.
  PYFUSE_HD int64_t first_child(int64_t node) const {
    const int64_t c = first[node];
    return c > 0 && c < n ? c : -1;
  }
  PYFUSE_HD int64_t next_child(int64_t c, int64_t count) const {
    const int64_t s = sibling[c];
    return s > 0 && s < n && count < n - 1 ? s : -1;
  }

  PYFUSE_HD float coin(int64_t node) const {
    return u ? u[node] : philox::uniform(seed, static_cast<uint64_t>(node), stream, kPurposeAccept);
  }
  PYFUSE_HD float final_coin() const {
    return u_final ? *u_final : philox::uniform(seed, 0, stream, kPurposeFinal);
  }
};

// The whole batch, as the bindings receive it. Tree arrays and outputs are contiguous; target/draft rows
// are contiguous along the vocabulary with the given element strides between batch rows and nodes.
struct Batch {
  const int64_t* candidates;    // [B, N]
  const int64_t* next_token;    // [B, N]
  const int64_t* next_sibling;  // [B, N]
  const void* target;           // [B, N, V]
  const void* draft;            // [B, N, V] or nullptr
  int32_t dtype;
  int64_t batch, n, vocab;
  int64_t batch_stride, node_stride;  // elements
  int32_t mode;
  int64_t max_depth;
  const int64_t* seeds;  // [B], key = seed mod 2^64
  int32_t row_streams;   // 1: Philox stream = row index (one seed for the batch); 0: stream 0
  const float* uniforms;        // [B, N] or nullptr
  const float* final_uniforms;  // [B] or nullptr
  double* work;                 // [B, N] scratch
  int32_t* accept_index;        // [B, max_depth + 1]
  int32_t* accept_len;          // [B]
  int32_t* token_ids;           // [B, max_depth + 1]
  int32_t* bonus;               // [B]
};

PYFUSE_HD Row make_row(const Batch& a, int64_t b) {
  const int64_t elem = dtype_size(a.dtype);
  const int64_t width = a.max_depth + 1;
  Row r;
  r.cand = a.candidates + b * a.n;
  r.first = a.next_token + b * a.n;
  r.sibling = a.next_sibling + b * a.n;
  r.target = static_cast<const char*>(a.target) + b * a.batch_stride * elem;
  r.draft = a.draft ? static_cast<const char*>(a.draft) + b * a.batch_stride * elem : nullptr;
  r.node_stride = a.node_stride * elem;
  r.dtype = a.dtype;
  r.n = a.n;
  r.vocab = a.vocab;
  r.mode = a.mode;
  r.max_depth = a.max_depth;
  r.u = a.uniforms ? a.uniforms + b * a.n : nullptr;
  r.u_final = a.final_uniforms ? a.final_uniforms + b : nullptr;
  r.seed = static_cast<uint64_t>(a.seeds[b]);
  r.stream = a.row_streams ? static_cast<uint32_t>(b) : 0u;
  r.inv_totals = a.work + b * a.n;
  r.accept_index = a.accept_index + b * width;
  r.token_ids = a.token_ids + b * width;
  r.accept_len = a.accept_len + b;
  r.bonus = a.bonus + b;
  return r;
}

namespace cpu {
void verify_tree(const Batch& a);
}
namespace cuda {
void verify_tree(const Batch& a, uintptr_t stream);
}

// Weight of token x in one of the walk's distributions: the row `p` pushed through `steps` residual steps
// against `q`, with the tokens of `excluded`'s children removed (target_only's tried siblings). Holds copies,
// not a pointer to the Row, so that CUDA can keep both in registers.
struct Weights {
  const void* p;
  const void* q;
  int32_t dtype;
  const double* inv_totals;
  int64_t steps;
  double q_inv;
  const int64_t* cand;
  const int64_t* first;
  const int64_t* sibling;
  int64_t n;
  int64_t excluded;  // node whose children's tokens weigh 0, or -1

  PYFUSE_HD int64_t operator()(int64_t x) const {
    int64_t w = weight(load_float(p, dtype, x));
    if (steps > 0) {
      const int64_t wq = weight(load_float(q, dtype, x));
      for (int64_t k = 0; k < steps; ++k) w = residual_step(w, inv_totals[k], wq, q_inv);
    }
    if (excluded >= 0) {
      // Same bounds as Row::first_child / Row::next_child.
      int64_t c = first[excluded];
      for (int64_t count = 1; c > 0 && c < n; ++count) {
        if (cand[c] == x) return 0;
        if (count >= n - 1) break;
        c = sibling[c];
      }
    }
    return w;
  }
};

PYFUSE_HD Weights plain_weights(const Row& r, const void* p) {
  Weights w = {p, nullptr, r.dtype, r.inv_totals, 0, 0.0, r.cand, r.first, r.sibling, r.n, -1};
  return w;
}

// Vocab policy interface: leader(), sync(), argmax(row) (first max, NaN ignored), sum(Weights),
// sample(Weights, threshold) (first x whose cumulative weight exceeds threshold).
template <class Vocab>
PYFUSE_HD int64_t final_sample(const Row& r, Vocab& vocab, const Weights& residual, int64_t node) {
  const float u = r.final_coin();
  int64_t total = vocab.sum(residual);
  if (total > 0) return vocab.sample(residual, static_cast<double>(u) * static_cast<double>(total));
  const Weights base = plain_weights(r, r.target_row(node));
  total = vocab.sum(base);
  if (total > 0) return vocab.sample(base, static_cast<double>(u) * static_cast<double>(total));
  return 0;
}

template <class Vocab>
PYFUSE_HD void walk(const Row& r, Vocab& vocab) {
  int64_t cur = 0;
  int64_t depth = 0;
  Weights residual = plain_weights(r, r.target_row(0));
  bool rejected = false;
  if (vocab.leader()) r.accept_index[0] = 0;
  while (depth < r.max_depth && r.first_child(cur) >= 0) {
    int64_t found = -1;
    int64_t count = 1;
    if (r.mode == kGreedy) {
      const int64_t best = vocab.argmax(r.target_row(cur));
      for (int64_t c = r.first_child(cur); c >= 0 && found < 0; c = r.next_child(c, count++)) {
        if (r.cand[c] == best) found = c;
      }
    } else if (r.mode == kTargetOnly) {
      const Weights w = plain_weights(r, r.target_row(cur));
      const double threshold = static_cast<double>(r.coin(cur)) * static_cast<double>(vocab.sum(w));
      int64_t acc = 0;
      for (int64_t c = r.first_child(cur); c >= 0 && found < 0; c = r.next_child(c, count++)) {
        const int64_t x = r.cand[c];
        bool fresh = x >= 0 && x < r.vocab;
        int64_t seen = 1;
        for (int64_t e = r.first_child(cur); e != c && fresh; e = r.next_child(e, seen++)) fresh = r.cand[e] != x;
        if (fresh) acc += w(x);
        // Only a fresh in-vocabulary candidate can be accepted, whatever the coin (validate=False inputs).
        if (fresh && threshold < static_cast<double>(acc)) found = c;
      }
      if (found < 0) {
        residual = w;
        residual.excluded = cur;
      }
    } else {
      residual = plain_weights(r, r.target_row(cur));
      residual.q = r.draft_row(cur);
      residual.q_inv = reciprocal(vocab.sum(plain_weights(r, residual.q)));
      for (int64_t c = r.first_child(cur); c >= 0 && found < 0; c = r.next_child(c, count++)) {
        const int64_t x = r.cand[c];
        const double inv = reciprocal(vocab.sum(residual));
        if (x >= 0 && x < r.vocab && inv > 0.0) {
          const double qx = static_cast<double>(weight(load_float(residual.q, r.dtype, x))) * residual.q_inv;
          const double px = static_cast<double>(residual(x)) * inv;
          if (static_cast<double>(r.coin(c)) * qx < px) found = c;
        }
        if (found < 0) {
          if (vocab.leader()) r.inv_totals[residual.steps] = inv;
          vocab.sync();
          ++residual.steps;
        }
      }
    }
    if (found < 0) {
      rejected = r.mode != kGreedy;
      break;
    }
    ++depth;
    cur = found;
    if (vocab.leader()) {
      r.accept_index[depth] = static_cast<int32_t>(cur);
      r.token_ids[depth - 1] = static_cast<int32_t>(r.cand[cur]);
    }
  }
  int64_t last;
  if (r.mode == kGreedy) {
    last = vocab.argmax(r.target_row(cur));
  } else {
    if (!rejected) residual = plain_weights(r, r.target_row(cur));
    last = final_sample(r, vocab, residual, cur);
  }
  if (vocab.leader()) {
    r.token_ids[depth] = static_cast<int32_t>(last);
    for (int64_t j = depth + 1; j <= r.max_depth; ++j) {
      r.accept_index[j] = -1;
      r.token_ids[j] = -1;
    }
    *r.accept_len = static_cast<int32_t>(depth);
    *r.bonus = static_cast<int32_t>(last);
  }
}

}  // namespace spec_tree
}  // namespace pyfuse
