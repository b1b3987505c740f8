// Chain verification on the CPU: one request per OpenMP iteration; the decisions come from
// pyfuse/spec_chain.h, the row reductions here are sequential (fixed order).
#include <math.h>

#include <vector>

#include "pyfuse/spec_chain.h"
#include "spec_lanes.h"

namespace pyfuse {
namespace cpu {
namespace {

// Sum of spec::fixed_weight(p - q) over n <= kChunk float32 entries (q null: q = 0): the hot loop of
// rejection sampling, written so that it vectorises: the clamp to [0, 1] (NaN -> 0) works on the bits, and
// int64(x), x = w * 2^40 < 2^41, is split as h * 2^20 + int(x - h * 2^20) with h = int(w * 2^20), so only
// int32 conversions and sums are needed (exact for n <= 1024). no-trapping-math lets GCC if-convert the
// loop; it changes no value. (Helpers are not called here: GCC does not inline across optimize attributes.)
constexpr int64_t kChunk = 1024;
const float kZeros[kChunk] = {};

__attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math")))
int64_t fixed_sum(const float* p, const float* q, int64_t n) {
  if (q == nullptr) q = kZeros;
  int32_t hi = 0, lo = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float w = p[j] - q[j];
    int32_t b;
    __builtin_memcpy(&b, &w, 4);
    b = b > 0x7f800000 ? 0 : b;           // +NaN
    b = b < 0x3f800000 ? b : 0x3f800000;  // above 1 (and +inf)
    b = b > 0 ? b : 0;                    // negative, -0, -NaN
    float c;
    __builtin_memcpy(&c, &b, 4);
    const float x = c * spec::kFixedScale;
    const int32_t h = static_cast<int32_t>(x * 0x1p-20f);
    hi += h;
    lo += static_cast<int32_t>(x - static_cast<float>(h) * 0x1p20f);
  }
  return static_cast<int64_t>(hi) * (int64_t{1} << 20) + lo;
}

using lanes::F16;
using lanes::I16;
using lanes::kLaneIndex;
using lanes::kLanes;

// exp(x) for softmax arguments x = (l - max) / T <= 0, 16 lanes at a time: Cody-Waite reduction by ln 2
// and Cephes' degree-5 polynomial (about 1 ulp from expf), branch-free so that it vectorises; x < -87
// (-inf included) gives 0, NaN stays NaN.
__attribute__((always_inline)) inline F16 exp_lanes(const F16& x) {
  const F16 zero = {};
  const F16 xc = x < -87.0f ? zero - 87.0f : x;
  const F16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const F16 r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  F16 p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F16 y = ((p * (r * r)) + r) + 1.0f;
  const F16 scale = reinterpret_cast<F16>((__builtin_convertvector(n, I16) + 127) << 23);
  return x < -87.0f ? zero : y * scale;
}

// out[j] = softmax(l / T)[j] for one row of n logits: max, exp, lane sum (fixed order), divide. The
// kernel's passes read these probabilities, so every pass sees the same value for a token.
template <int DT>
__attribute__((target_clones("avx512f", "avx2", "default")))
void softmax_row(const void* logits, int64_t n, float temperature, float* out) {
  F16 mx = {};
  mx -= INFINITY;
  lanes::for_blocks<DT>(logits, n, [&](const F16& v, int k) { mx = (kLaneIndex < k) & (v > mx) ? v : mx; });
  const float m = lanes::max(mx);
  F16 s = {};
  int64_t j = 0;
  lanes::for_blocks<DT>(logits, n, [&](const F16& v, int k) {
    const F16 e = exp_lanes((v - m) / temperature);
    s += kLaneIndex < k ? e : F16{};
    __builtin_memcpy(out + j, &e, k * sizeof(float));
    j += k;
  });
  const float total = lanes::sum(s);
  for (int64_t i = 0; i < n; ++i) out[i] /= total;
}

// One per thread. Rejection sampling reads logit rows as probabilities materialised in two row buffers,
// used in turn: ChainOps holds at most the two most recent rows (target, then draft) at once.
struct SequentialReducer {
  const spec::ChainArgs& a;
  std::vector<float> buffers[2] = {};
  int slot = 0;

  spec::ProbRow row(const void* ptr, int32_t dtype, int32_t logits, int64_t off) {
    spec::ProbRow r{ptr, dtype, logits, a.temperature, off, 0.0f, 1.0f};
    if (!logits) return r;
    if (a.mode == spec::kRejection) {
      std::vector<float>& buf = buffers[slot];
      slot ^= 1;
      buf.resize(a.vocab);
      const void* p = static_cast<const char*>(ptr) + off * dtype_size(dtype);
      if (dtype == kFloat32) {
        softmax_row<kFloat32>(p, a.vocab, a.temperature, buf.data());
      } else if (dtype == kFloat16) {
        softmax_row<kFloat16>(p, a.vocab, a.temperature, buf.data());
      } else {
        softmax_row<kBFloat16>(p, a.vocab, a.temperature, buf.data());
      }
      return spec::ProbRow{buf.data(), kFloat32, 0, a.temperature, 0, 0.0f, 1.0f};
    }
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

  int64_t inverse_cdf(const spec::ProbRow& p, const spec::ProbRow* q, int64_t x, float u) const {
    const bool dense = p.dtype == kFloat32 && !p.logits && (q == nullptr || (q->dtype == kFloat32 && !q->logits));
    if (!dense) {
      const auto weight = [&](int64_t j) { return spec::residual_weight(p, q, x, j); };
      const auto chunk = [&](int64_t lo, int64_t hi) {
        int64_t t = 0;
        for (int64_t j = lo; j < hi; ++j) t += weight(j);
        return t;
      };
      return scan(weight, a.vocab, chunk, u);
    }
    // float32 probabilities: vectorised chunk sums; the one-hot draft is a correction at x.
    const float* pf = static_cast<const float*>(p.ptr) + p.off;
    const float* qf = q != nullptr ? static_cast<const float*>(q->ptr) + q->off : nullptr;
    const bool onehot = q == nullptr && x >= 0;
    const int64_t wx = onehot ? spec::fixed_weight(pf[x] - 1.0f) - spec::fixed_weight(pf[x]) : 0;
    const auto chunk = [&](int64_t lo, int64_t hi) {
      return fixed_sum(pf + lo, qf != nullptr ? qf + lo : nullptr, hi - lo) + (lo <= x && x < hi ? wx : 0);
    };
    const auto weight = [&](int64_t j) {
      return spec::fixed_weight(pf[j] - (qf != nullptr ? qf[j] : (j == x ? 1.0f : 0.0f)));
    };
    return scan(weight, a.vocab, chunk, u);
  }

 private:
  // Inverse CDF: total from chunk sums, then the chunk holding the threshold, then the token inside it.
  template <class Weight, class Chunk>
  static int64_t scan(const Weight& weight, int64_t vocab, const Chunk& chunk, float u) {
    int64_t total = 0;
    for (int64_t lo = 0; lo < vocab; lo += kChunk) total += chunk(lo, lo + kChunk < vocab ? lo + kChunk : vocab);
    if (total == 0) return -1;
    const int64_t thr = spec::sample_threshold(u, total);
    int64_t c = 0;
    for (int64_t lo = 0; lo < vocab; lo += kChunk) {
      const int64_t hi = lo + kChunk < vocab ? lo + kChunk : vocab;
      const int64_t next = c + chunk(lo, hi);
      if (next <= thr) {
        c = next;
        continue;
      }
      for (int64_t j = lo; j < hi; ++j) {
        c += weight(j);
        if (c > thr) return j;
      }
    }
    return vocab - 1;
  }
};

}  // namespace

void spec_chain_verify(const spec::ChainArgs& args) {
#pragma omp parallel if (args.batch > 1)
  {
    SequentialReducer reducer{args};
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < args.batch; ++b) spec::verify_request(args, b, reducer, true);
  }
}

}  // namespace cpu
}  // namespace pyfuse
