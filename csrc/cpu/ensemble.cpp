// Union-vocabulary ensembling on the CPU: one batch row per OpenMP task. A row's model exponentials are
// computed once into per-thread scratch (O(V_m), in L2) and gathered into union tiles through the reverse
// index (first id vectorised, the rare many-to-one ids added after, in id order). All sums over sets are
// fixed-point, so the result does not depend on the thread count.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pyfuse/ensemble.h"

namespace pyfuse {
namespace cpu {
namespace {

using ensemble::Args;
using ensemble::exp_det;
using ensemble::fix;
using ensemble::unfix_recip;

constexpr int64_t kTile = 1024;
const float kNegInf = bits_float(0xFF800000u);

#define PYFUSE_HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define PYFUSE_INLINE inline __attribute__((always_inline))

inline const void* row_ptr(const Args& a, int m, int64_t b) {
  return static_cast<const char*>(a.logits[m]) + b * a.row_stride[m] * dtype_size(a.dtype);
}

// e[v] = exp_det(y_v - max y) at valid ids, 0 elsewhere (stored when STORE); returns 1 / S, the max in
// *mx_out and, in *top, an id of the maximum (-1 when no valid id is finite).
template <int DT, bool STORE>
PYFUSE_INLINE float model_exps_t(const void* x, const int32_t* fwd, int64_t V, float inv_t, float* e, float* mx_out,
                                 int64_t* top) {
  // Max in 16 lanes: a float max reduction only vectorises with -ffast-math. Max is order-free.
  constexpr int kLanes = 16;
  float lane[kLanes];
  int32_t lane_at[kLanes];  // V <= 2^22
  for (int j = 0; j < kLanes; ++j) {
    lane[j] = kNegInf;
    lane_at[j] = -1;
  }
  int64_t v = 0;
  // The max of x: a positive inv_t keeps the order, and fl(max x * inv_t) is the max of the y.
  for (; v + kLanes <= V; v += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float y = ensemble::select(fwd[v + j] >= 0, load_float(x, DT, v + j), kNegInf);
      const bool more = y > lane[j];
      lane[j] = more ? y : lane[j];
      if (!STORE) lane_at[j] = more ? static_cast<int32_t>(v + j) : lane_at[j];  // only the greedy path needs it
    }
  }
  float mx = kNegInf;
  int64_t at = -1;
  for (; v < V; ++v) {
    const float y = ensemble::select(fwd[v] >= 0, load_float(x, DT, v), kNegInf);
    at = y > mx ? v : at;
    mx = y > mx ? y : mx;
  }
  for (int j = 0; j < kLanes; ++j) {
    at = lane[j] > mx ? lane_at[j] : at;
    mx = lane[j] > mx ? lane[j] : mx;
  }
  mx = mx * inv_t;
  *top = at;
  *mx_out = mx;
  int64_t s = 0;
  for (v = 0; v < V; ++v) {
    const float ev = ensemble::select(fwd[v] >= 0, exp_det(load_float(x, DT, v) * inv_t - mx), 0.0f);
    if (STORE) e[v] = ev;
    s += fix(ev);
  }
  return unfix_recip(s);
}

#define PYFUSE_MODEL_EXPS(name, DT, STORE)                                                          \
  PYFUSE_HOT float name(const void* x, const int32_t* f, int64_t V, float t, float* e, float* mx,    \
                        int64_t* top) {                                                             \
    return model_exps_t<DT, STORE>(x, f, V, t, e, mx, top);                                         \
  }
PYFUSE_MODEL_EXPS(model_exps_f32, kFloat32, true)
PYFUSE_MODEL_EXPS(model_exps_f16, kFloat16, true)
PYFUSE_MODEL_EXPS(model_exps_bf16, kBFloat16, true)
PYFUSE_MODEL_EXPS(model_stats_f32, kFloat32, false)
PYFUSE_MODEL_EXPS(model_stats_f16, kFloat16, false)
PYFUSE_MODEL_EXPS(model_stats_bf16, kBFloat16, false)

// e == nullptr: statistics only.
float model_exps(int32_t dtype, const void* x, const int32_t* f, int64_t V, float t, float* e, float* mx,
                 int64_t* top) {
  if (dtype == kFloat32) return (e ? model_exps_f32 : model_stats_f32)(x, f, V, t, e, mx, top);
  if (dtype == kFloat16) return (e ? model_exps_f16 : model_stats_f16)(x, f, V, t, e, mx, top);
  return (e ? model_exps_bf16 : model_stats_bf16)(x, f, V, t, e, mx, top);
}

// E[i] = e[first[i]] (0 where none). GCC's generic tuning never emits gathers, hence the intrinsics.
void gather_first_scalar(const int32_t* first, const float* e, int64_t n, float* E) {
  for (int64_t i = 0; i < n; ++i) E[i] = first[i] >= 0 ? e[first[i]] : 0.0f;
}

__attribute__((target("avx512f"))) void gather_first_avx512(const int32_t* first, const float* e, int64_t n,
                                                              float* E) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_loadu_si512(first + i);
    const __mmask16 has = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
    _mm512_storeu_ps(E + i, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), has, idx, e, 4));  // masked lanes: no load
  }
  gather_first_scalar(first + i, e, n - i, E + i);
}

bool have_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();  // may run before libgcc's own initialiser
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

void gather_first(const int32_t* first, const float* e, int64_t n, float* E) {
  if (have_avx512()) {
    gather_first_avx512(first, e, n, E);
  } else {
    gather_first_scalar(first, e, n, E);
  }
}

PYFUSE_HOT void add_prob(float* acc, const float* E, int64_t n, float w, float inv_s) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * (E[i] * inv_s);
}

PYFUSE_HOT void add_logprob(float* acc, uint8_t* used, const float* E, const uint8_t* present, int64_t n, float w,
                            float inv_s, int m, bool renormalize) {
  for (int64_t i = 0; i < n; ++i) {
    const bool take = !renormalize || ((present[i] >> m) & 1);
    acc[i] = ensemble::select(take, acc[i] + w * ensemble::log_det(E[i] * inv_s), acc[i]);
    used[i] = used[i] | static_cast<uint8_t>(take);
  }
}

PYFUSE_HOT void finish_unit(const float* acc, const uint8_t* used, int64_t n, bool logprob, float* key) {
  for (int64_t i = 0; i < n; ++i) key[i] = logprob ? ensemble::select(used[i] != 0, acc[i], kNegInf) : acc[i];
}

// A row's per-model state: exponentials e[m] (scratch of V_m floats, or none), max, 1 / S, an id of the max.
struct RowModels {
  float* e[ensemble::kMaxModels];
  float mx[ensemble::kMaxModels];
  float inv_s[ensemble::kMaxModels];
  int64_t top[ensemble::kMaxModels];
};

void row_models(const Args& a, int64_t b, RowModels& r, bool store) {
  for (int m = 0; m < a.num_models; ++m) {
    r.inv_s[m] = model_exps(a.dtype, row_ptr(a, m, b), a.to_union[m], a.vocab[m], a.inv_temp[m],
                            store ? r.e[m] : nullptr, &r.mx[m], &r.top[m]);
  }
}

// key(u) of one union id from the logits, operation for operation as row_keys.
float key_of(const Args& a, int64_t b, const RowModels& r, int64_t u) {
  const int M = a.num_models;
  const uint8_t pat = a.present[u] & static_cast<uint8_t>((1u << M) - 1u);
  float acc = 0.0f;
  bool used = false;
  for (int m = 0; m < M; ++m) {
    const void* x = row_ptr(a, m, b);
    float E = 0.0f;
    for (int64_t j = a.rev_offsets[m][u]; j < a.rev_offsets[m][u + 1]; ++j) {
      E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - r.mx[m]);
    }
    ensemble::combine_step(acc, used, a.weights[b * M + m], E * r.inv_s[m], (pat >> m) & 1, a.logprob,
                           a.renormalize);
  }
  return ensemble::combine_finish(acc, used, a.renormalize ? a.cpat[(b << M) + pat] : 1.0f, a.logprob);
}

// key(u) of batch row b for the whole union, into key[U].
void row_keys(const Args& a, int64_t b, const RowModels& r, float* key) {
  const int M = a.num_models;
  const int64_t U = a.union_size;
  const float* const* e = r.e;
  const float* inv_s = r.inv_s;
  int64_t cursor[ensemble::kMaxModels] = {};
  const float* w = a.weights + b * M;
  const float* cpat = a.cpat + b * (int64_t{1} << M);
  const uint8_t mask = static_cast<uint8_t>((1u << M) - 1u);
  float E[kTile], tile_acc[kTile];
  uint8_t used[kTile];
  // Mode "prob" + absent "zero": the key is the sum itself, accumulated in place.
  const bool direct = !a.logprob && !a.renormalize;
  for (int64_t u0 = 0; u0 < U; u0 += kTile) {
    const int64_t n = std::min(kTile, U - u0);
    const uint8_t* present = a.present + u0;
    float* acc = direct ? key + u0 : tile_acc;
    std::fill(acc, acc + n, 0.0f);
    std::fill(used, used + n, uint8_t{0});
    for (int m = 0; m < M; ++m) {
      gather_first(a.first_ids[m] + u0, e[m], n, E);
      // Many-to-one union ids: the other model ids, in ascending order after the first.
      for (int64_t& c = cursor[m]; c < a.num_multi[m] && a.multi[m][c] < u0 + n; ++c) {
        const int64_t u = a.multi[m][c];
        for (int64_t j = a.rev_offsets[m][u] + 1; j < a.rev_offsets[m][u + 1]; ++j) {
          E[u - u0] = E[u - u0] + e[m][a.rev_ids[m][j]];
        }
      }
      if (!a.logprob) {
        add_prob(acc, E, n, w[m], inv_s[m]);
      } else if (w[m] > 0.0f) {
        add_logprob(acc, used, E, present, n, w[m], inv_s[m], m, a.renormalize);
      }
    }
    if (a.renormalize) {
      for (int64_t i = 0; i < n; ++i) {
        key[u0 + i] = ensemble::combine_finish(acc[i], used[i] != 0, cpat[present[i] & mask], a.logprob);
      }
    } else if (!direct) {  // c(u) == 1: the same values, vectorised
      finish_unit(acc, used, n, a.logprob, key + u0);
    }
  }
}

// Keys -> scores r in place (logprob: exp_det(key - max)); returns the fixed-point total Z.
PYFUSE_HOT int64_t keys_to_scores(float* key, int64_t U, bool logprob) {
  int64_t z = 0;
  if (!logprob) {
    for (int64_t u = 0; u < U; ++u) z += fix(key[u]);
    return z;
  }
  float kmax = kNegInf;
  for (int64_t u = 0; u < U; ++u) kmax = key[u] > kmax ? key[u] : kmax;
  const bool any = kmax > kNegInf;
  for (int64_t u = 0; u < U; ++u) {
    const float r = any ? exp_det(key[u] - kmax) : 0.0f;
    key[u] = r;
    z += fix(r);
  }
  return z;
}

// Appends to_union[v] for the valid ids with y_v >= thr, and for those with y_v >= thr_multi (<= thr) whose
// union id has several model ids (their sum may pass). Blocks are screened with a vectorised count.
template <int DT>
PYFUSE_INLINE void candidates_above_t(const void* x, const int32_t* fwd, const int32_t* rev_offsets, int64_t V,
                                      float inv_t, float thr, float thr_multi, std::vector<int64_t>& out) {
  constexpr int64_t kBlock = 256;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = std::min(kBlock, V - v0);
    int32_t hits = 0;
    for (int64_t v = v0; v < v0 + n; ++v) hits += load_float(x, DT, v) * inv_t >= thr_multi;
    if (hits == 0) continue;
    for (int64_t v = v0; v < v0 + n; ++v) {
      const float y = load_float(x, DT, v) * inv_t;
      const int32_t u = fwd[v];
      if (u < 0 || !(y >= thr_multi)) continue;
      if (y >= thr || rev_offsets[u + 1] - rev_offsets[u] > 1) out.push_back(u);
    }
  }
}

#define PYFUSE_CANDIDATES(name, DT)                                                                    \
  PYFUSE_HOT void name(const void* x, const int32_t* f, const int32_t* off, int64_t V, float t, float thr, \
                       float thr_multi, std::vector<int64_t>& o) {                                    \
    candidates_above_t<DT>(x, f, off, V, t, thr, thr_multi, o);                                       \
  }
PYFUSE_CANDIDATES(candidates_f32, kFloat32)
PYFUSE_CANDIDATES(candidates_f16, kFloat16)
PYFUSE_CANDIDATES(candidates_bf16, kBFloat16)

void candidates_above(const Args& a, int m, int64_t b, float thr, float thr_multi, std::vector<int64_t>& out) {
  const void* x = row_ptr(a, m, b);
  auto fn = a.dtype == kFloat32 ? candidates_f32 : a.dtype == kFloat16 ? candidates_f16 : candidates_bf16;
  fn(x, a.to_union[m], a.rev_offsets[m], a.vocab[m], a.inv_temp[m], thr, thr_multi, out);
}

PYFUSE_HOT void scale(float* x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * s;
}

// Per-thread scratch: one exponential row per model.
struct Scratch {
  std::vector<std::vector<float>> rows;
  RowModels models;
  explicit Scratch(const Args& a) : rows(a.num_models) {
    for (int m = 0; m < a.num_models; ++m) {
      rows[m].resize(a.vocab[m]);
      models.e[m] = rows[m].data();
    }
  }
};

// Greedy next token for mode "prob", absent "zero", without computing every key: with tau the best key
// of the models' top-1 ids, a union id can reach tau only if some model has w_m * P_m(u) >= tau / M, i.e.
// e_v >= tau / (M * w_m * inv_s_m) for one of its ids (many-to-one ids are always checked). Half that
// threshold leaves room for rounding; the candidates' keys are computed exactly as in row_keys.
int64_t greedy_prob_zero(const Args& a, int64_t b, const RowModels& r, std::vector<int64_t>& cand, float* best_key) {
  const int M = a.num_models;
  const float* w = a.weights + b * M;
  cand.clear();
  for (int m = 0; m < M; ++m) {
    if (r.top[m] >= 0 && w[m] > 0.0f) cand.push_back(a.to_union[m][r.top[m]]);
  }
  float tau = 0.0f;
  for (int64_t u : cand) tau = std::max(tau, key_of(a, b, r, u));
  if (!(tau > 0.0f)) {
    *best_key = 0.0f;
    return -1;
  }
  for (int m = 0; m < M; ++m) {
    if (!(w[m] > 0.0f)) continue;
    // e_v >= thr  <=>  y_v >= mx + log(thr); 0.01 more slack for the rounding of y and exp_det.
    const double thr = 0.5 * tau / (static_cast<double>(M) * w[m] * r.inv_s[m]);
    // A union id with n model ids needs one of them at >= thr / n.
    const double ythr = r.mx[m] + std::log(thr) - 0.01;
    candidates_above(a, m, b, static_cast<float>(ythr),
                     static_cast<float>(ythr - std::log(static_cast<double>(std::max<int64_t>(a.max_mult[m], 1)))),
                     cand);
  }
  int64_t best = -1;
  float kbest = 0.0f;
  for (int64_t u : cand) {
    const float k = key_of(a, b, r, u);
    if (k > kbest || (k == kbest && best >= 0 && u < best)) {
      kbest = k;
      best = u;
    }
  }
  *best_key = kbest;
  return best;
}

}  // namespace

void union_probs(const Args& a, float* out) {
  const bool normalize = a.logprob || a.renormalize;  // mode "prob" + absent "zero" already sums to 1
#pragma omp parallel
  {
    Scratch s(a);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      float* row = out + b * a.union_size;
      row_models(a, b, s.models, true);
      row_keys(a, b, s.models, row);
      if (normalize) scale(row, a.union_size, unfix_recip(keys_to_scores(row, a.union_size, a.logprob)));
    }
  }
}

void next_token(const Args& a, bool greedy, uint64_t seed, uint32_t stream, int64_t* union_ids, int64_t* model_ids,
                float* prob) {
  const int64_t U = a.union_size;
  const bool normalize = a.logprob || a.renormalize;
#pragma omp parallel
  {
    Scratch s(a);
    std::vector<float> key;
    std::vector<int64_t> cand;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      const bool fast = greedy && !normalize;
      row_models(a, b, s.models, !fast);
      int64_t chosen = -1;
      float p = 0.0f;
      if (fast) {
        chosen = greedy_prob_zero(a, b, s.models, cand, &p);
      } else {
        key.resize(U);
        row_keys(a, b, s.models, key.data());
        int64_t best = 0;  // first maximum of the keys (before the logprob exp can merge neighbours)
        for (int64_t u = 1; u < U; ++u) best = key[u] > key[best] ? u : best;
        const bool no_key = a.logprob ? !(key[best] > kNegInf) : !(key[best] > 0.0f);
        const int64_t z = keys_to_scores(key.data(), U, a.logprob);
        const float inv_z = normalize ? unfix_recip(z) : 1.0f;
        if (greedy) {
          chosen = no_key ? -1 : best;
        } else if (z > 0) {
          const int64_t target = ensemble::sample_target(z, seed, b, stream);
          int64_t cum = 0;
          for (int64_t u = 0; u < U && chosen < 0; ++u) {
            cum += fix(key[u]);
            if (cum > target) chosen = u;
          }
        }
        p = chosen < 0 ? 0.0f : key[chosen] * inv_z;
      }
      union_ids[b] = chosen;
      prob[b] = p;
      for (int m = 0; m < a.num_models; ++m) {
        model_ids[b * a.num_models + m] = chosen < 0 ? -1 : a.from_union[m][chosen];
      }
    }
  }
}

namespace {

// The k best (value desc, id asc) valid ids of one model row, as sort keys, best first.
template <int DT>
int top_keys(const void* x, const int32_t* fwd, int64_t V, int k, int64_t* best) {
  int n = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (fwd[v] < 0) continue;
    const int64_t key = ensemble::sort_key(load_float(x, DT, v), v);
    if (n == k && key <= best[k - 1]) continue;
    int i = n < k ? n++ : k - 1;
    for (; i > 0 && best[i - 1] < key; --i) best[i] = best[i - 1];
    best[i] = key;
  }
  return n;
}

int top_keys(int32_t dtype, const void* x, const int32_t* fwd, int64_t V, int k, int64_t* best) {
  if (dtype == kFloat32) return top_keys<kFloat32>(x, fwd, V, k, best);
  if (dtype == kFloat16) return top_keys<kFloat16>(x, fwd, V, k, best);
  return top_keys<kBFloat16>(x, fwd, V, k, best);
}

inline int64_t key_id(int64_t key) { return 4294967295LL - (key & 0xFFFFFFFFLL); }

}  // namespace

void union_topk(const Args& a, int k, float* probs, int64_t* union_ids) {
  const int M = a.num_models;
#pragma omp parallel
  {
    std::vector<int64_t> best(k), cand(static_cast<size_t>(M) * k);
    std::vector<float> P(static_cast<size_t>(M) * M * k), key(static_cast<size_t>(M) * k), score(key.size());
    std::vector<int> order(static_cast<size_t>(M) * k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      float mx[ensemble::kMaxModels];
      int nc = 0;
      for (int m = 0; m < M; ++m) {
        const void* x = row_ptr(a, m, b);
        const int got = top_keys(a.dtype, x, a.to_union[m], a.vocab[m], k, best.data());
        mx[m] = load_float(x, a.dtype, key_id(best[0])) * a.inv_temp[m];
        for (int i = 0; i < got; ++i) cand[nc++] = a.to_union[m][key_id(best[i])];
      }
      std::sort(cand.begin(), cand.begin() + nc);
      nc = static_cast<int>(std::unique(cand.begin(), cand.begin() + nc) - cand.begin());
      // Each model's mass on each candidate, renormalised over the candidates.
      for (int m = 0; m < M; ++m) {
        const void* x = row_ptr(a, m, b);
        float* Pm = P.data() + static_cast<size_t>(m) * M * k;
        int64_t d = 0;
        for (int c = 0; c < nc; ++c) {
          float E = 0.0f;
          for (int64_t j = a.rev_offsets[m][cand[c]]; j < a.rev_offsets[m][cand[c] + 1]; ++j) {
            E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - mx[m]);
          }
          Pm[c] = E;
          d += fix(E);
        }
        const float inv_d = unfix_recip(d);
        for (int c = 0; c < nc; ++c) Pm[c] = Pm[c] * inv_d;
      }
      const float* w = a.weights + b * M;
      const float* cpat = a.cpat + b * (int64_t{1} << M);
      for (int c = 0; c < nc; ++c) {
        const uint8_t pat = a.present[cand[c]] & static_cast<uint8_t>((1u << M) - 1u);
        float acc = 0.0f;
        bool used = false;
        for (int m = 0; m < M; ++m) {
          ensemble::combine_step(acc, used, w[m], P[static_cast<size_t>(m) * M * k + c], (pat >> m) & 1, a.logprob,
                                 a.renormalize);
        }
        key[c] = ensemble::combine_finish(acc, used, cpat[pat], a.logprob);
        order[c] = c;
      }
      // Key desc, union id asc (candidates are sorted by id); bit-pattern keys give a total order even for NaN.
      std::stable_sort(order.begin(), order.begin() + nc, [&](int i, int j) {
        return ensemble::sort_key(key[i], 0) > ensemble::sort_key(key[j], 0);
      });
      float kmax = kNegInf;
      for (int c = 0; c < nc; ++c) kmax = key[c] > kmax ? key[c] : kmax;
      int64_t z = 0;
      for (int c = 0; c < nc; ++c) {
        score[c] = a.logprob ? (kmax > kNegInf ? exp_det(key[c] - kmax) : 0.0f) : key[c];
        z += fix(score[c]);
      }
      const float inv_z = unfix_recip(z);
      for (int i = 0; i < k; ++i) {
        const bool have = i < nc;
        probs[b * k + i] = have ? score[order[i]] * inv_z : 0.0f;
        union_ids[b * k + i] = have ? cand[order[i]] : -1;
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyfuse
