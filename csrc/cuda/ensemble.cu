// Union-vocabulary ensembling on CUDA: the arithmetic of pyfuse/reference/ensemble.py through the shared
// header (table-and-quadratic exp, Cephes log, fixed-point sums; built with -fmad=false), so results equal the
// CPU and Triton backends bit for bit. Block reductions use a fixed shared-memory tree; float sums over sets are
// fixed-point int64, so the grid shape never changes a result. Cross-tile steps run in torch (ops.py).
#include "cuda/check.cuh"
#include "pyfuse/ensemble.h"

namespace pyfuse {
namespace cuda {
namespace {

using ensemble::Args;
using ensemble::exp_det;
using ensemble::fix;

constexpr int kThreads = kTile;  // one union id per thread in the tiled kernels
constexpr int64_t kInt64Min = -9223372036854775807LL - 1;
static_assert(ensemble::kMaxModels * ensemble::kMaxTopk <= kThreads, "topk_kernel: one candidate per thread");

__device__ __forceinline__ float neg_inf() { return bits_float(0xFF800000u); }

struct MaxF {
  __device__ float operator()(float x, float y) const { return y > x ? y : x; }
};
struct MaxI {
  __device__ int64_t operator()(int64_t x, int64_t y) const { return y > x ? y : x; }
};
struct MinI {
  __device__ int64_t operator()(int64_t x, int64_t y) const { return y < x ? y : x; }
};
struct SumI {
  __device__ int64_t operator()(int64_t x, int64_t y) const { return x + y; }
};

// Fixed-tree block reduction; every thread gets the result. sh: kThreads elements.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ const void* row_ptr(const Args& a, int m, int64_t b) {
  return static_cast<const char*>(a.logits[m]) + b * a.row_stride[m] * dtype_size(a.dtype);
}

// key(u) of row b (spec steps 2-3).
__device__ float union_key(const Args& a, int64_t b, int64_t u, const float* mx, const float* inv_s) {
  const int M = a.num_models;
  const uint32_t pat = a.present[u] & ((1u << M) - 1u);
  float acc = 0.0f;
  bool used = false;
  for (int m = 0; m < M; ++m) {
    const void* x = row_ptr(a, m, b);
    const float top = mx[b * M + m];
    float E = 0.0f;
    for (int64_t j = a.rev_offsets[m][u]; j < a.rev_offsets[m][u + 1]; ++j) {
      E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - top);
    }
    ensemble::combine_step(acc, used, a.weights[b * M + m], E * inv_s[b * M + m], (pat >> m) & 1u, a.logprob,
                           a.renormalize);
  }
  return ensemble::combine_finish(acc, used, a.cpat[(b << M) + pat], a.logprob);
}

// r(u) from key(u): logprob scores are exp_det(key - max key).
__device__ __forceinline__ float score_of(const Args& a, float key, float kmax) {
  if (!a.logprob) return key;
  return kmax > neg_inf() ? exp_det(key - kmax) : 0.0f;
}

__global__ void model_stats_kernel(Args a, float* mx, int64_t* total) {
  __shared__ float shf[kThreads];
  __shared__ int64_t shi[kThreads];
  const int64_t b = blockIdx.x;
  const int m = blockIdx.y;
  const void* x = row_ptr(a, m, b);
  const int32_t* fwd = a.to_union[m];
  const float it = a.inv_temp[m];
  float best = neg_inf();
  for (int64_t v = threadIdx.x; v < a.vocab[m]; v += kThreads) {
    if (fwd[v] >= 0) best = MaxF()(best, load_float(x, a.dtype, v) * it);
  }
  const float top = block_reduce(best, MaxF(), shf);
  int64_t s = 0;
  for (int64_t v = threadIdx.x; v < a.vocab[m]; v += kThreads) {
    if (fwd[v] >= 0) s += fix(exp_det(load_float(x, a.dtype, v) * it - top));
  }
  s = block_reduce(s, SumI(), shi);
  if (threadIdx.x == 0) {
    mx[b * a.num_models + m] = top;
    total[b * a.num_models + m] = s;
  }
}

// mode 0: out[b, u] = key; 1: tile max key and lowest union id reaching it; 2: tile fixed-point score sum.
__global__ void union_pass_kernel(Args a, int mode, const float* mx, const float* inv_s, const float* kmax, float* out,
                                  float* tile_val, int64_t* tile_idx) {
  __shared__ float shf[kThreads];
  __shared__ int64_t shi[kThreads];
  const int64_t b = blockIdx.y;
  const int64_t t = blockIdx.x;
  const int64_t n_tiles = gridDim.x;
  const int64_t u = t * kThreads + threadIdx.x;
  const bool inside = u < a.union_size;
  const float key = inside ? union_key(a, b, u, mx, inv_s) : neg_inf();
  if (mode == 0) {
    if (inside) out[b * a.union_size + u] = key;
  } else if (mode == 1) {
    const float best = block_reduce(key, MaxF(), shf);
    const int64_t at = block_reduce(inside && key == best ? u : a.union_size, MinI(), shi);
    if (threadIdx.x == 0) {
      tile_val[b * n_tiles + t] = best;
      tile_idx[b * n_tiles + t] = at;
    }
  } else {
    const int64_t s = block_reduce(inside ? fix(score_of(a, key, kmax[b])) : int64_t{0}, SumI(), shi);
    if (threadIdx.x == 0) tile_idx[b * n_tiles + t] = s;
  }
}

// Row b: in tile[b], the first union id whose cumulative fixed-point score (from base[b]) exceeds target[b].
__global__ void pick_kernel(Args a, const float* mx, const float* inv_s, const float* kmax, const int64_t* tile,
                            const int64_t* base, const int64_t* target, int64_t* chosen, float* score) {
  __shared__ int64_t sh[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t t = tile[b];
  if (t < 0) return;
  const int64_t u = t * kThreads + threadIdx.x;
  const bool inside = u < a.union_size;
  const float r = inside ? score_of(a, union_key(a, b, u, mx, inv_s), kmax[b]) : 0.0f;
  // Inclusive scan (Hillis-Steele, integer: exact).
  sh[threadIdx.x] = inside ? fix(r) : 0;
  __syncthreads();
  for (int s = 1; s < kThreads; s <<= 1) {
    const int64_t add = threadIdx.x >= s ? sh[threadIdx.x - s] : 0;
    __syncthreads();
    sh[threadIdx.x] += add;
    __syncthreads();
  }
  const bool hit = inside && base[b] + sh[threadIdx.x] > target[b];
  __syncthreads();
  const int64_t first = block_reduce(hit ? u : a.union_size, MinI(), sh);
  if (u == first) {
    chosen[b] = u;
    score[b] = r;
  }
}

__global__ void scores_kernel(Args a, float* out, const float* kmax, int64_t* tile_sum) {
  __shared__ int64_t sh[kThreads];
  const int64_t b = blockIdx.y;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool inside = u < a.union_size;
  float r = 0.0f;
  if (inside) {
    r = score_of(a, out[b * a.union_size + u], kmax[b]);
    out[b * a.union_size + u] = r;
  }
  const int64_t s = block_reduce(inside ? fix(r) : int64_t{0}, SumI(), sh);
  if (threadIdx.x == 0) tile_sum[b * gridDim.x + blockIdx.x] = s;
}

__global__ void scale_kernel(Args a, float* out, const float* inv_z) {
  const int64_t b = blockIdx.y;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (u < a.union_size) out[b * a.union_size + u] = out[b * a.union_size + u] * inv_z[b];
}

// Row b: UniTE top-k. Candidate c (< M*k <= kThreads) lives in thread c.
__global__ void topk_kernel(Args a, int k, float* probs, int64_t* union_ids) {
  __shared__ int64_t cand[kThreads];
  __shared__ int64_t sh[kThreads];
  __shared__ float shf[kThreads];
  __shared__ float tops[ensemble::kMaxModels];
  const int64_t b = blockIdx.x;
  const int M = a.num_models;
  const int C = M * k;
  const int c = threadIdx.x;
  for (int m = 0; m < M; ++m) {
    const void* x = row_ptr(a, m, b);
    int64_t prev = 9223372036854775807LL;
    for (int i = 0; i < k; ++i) {
      int64_t best = kInt64Min;
      for (int64_t v = threadIdx.x; v < a.vocab[m]; v += kThreads) {
        if (a.to_union[m][v] < 0) continue;
        const int64_t key = ensemble::sort_key(load_float(x, a.dtype, v), v);
        if (key < prev) best = MaxI()(best, key);
      }
      prev = block_reduce(best, MaxI(), sh);
      if (threadIdx.x == 0) {
        const bool found = prev != kInt64Min;
        const int64_t vid = 4294967295LL - (prev & 4294967295LL);
        cand[m * k + i] = found ? a.to_union[m][vid] : -1;
        if (i == 0) tops[m] = found ? load_float(x, a.dtype, vid) : 0.0f;
      }
    }
  }
  __syncthreads();
  bool keep = c < C && cand[c] >= 0;
  for (int j = 0; keep && j < c; ++j) keep = cand[j] != cand[c];
  const int64_t u = keep ? cand[c] : 0;
  const uint32_t pat = keep ? a.present[u] & ((1u << M) - 1u) : 0u;
  float acc = 0.0f;
  bool used = false;
  for (int m = 0; m < M; ++m) {
    const void* x = row_ptr(a, m, b);
    const float top = tops[m] * a.inv_temp[m];  // a positive temperature keeps the top-1 id the max
    float E = 0.0f;
    if (keep) {
      for (int64_t j = a.rev_offsets[m][u]; j < a.rev_offsets[m][u + 1]; ++j) {
        E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - top);
      }
    }
    const int64_t d = block_reduce(keep ? fix(E) : int64_t{0}, SumI(), sh);
    ensemble::combine_step(acc, used, a.weights[b * M + m], E * ensemble::unfix_recip(d), (pat >> m) & 1u, a.logprob,
                           a.renormalize);
  }
  const float key = ensemble::combine_finish(acc, used, a.cpat[(b << M) + pat], a.logprob);
  const float kmax = block_reduce(keep ? key : neg_inf(), MaxF(), shf);
  const float r = keep ? score_of(a, key, kmax) : 0.0f;
  const float inv_z = ensemble::unfix_recip(block_reduce(keep ? fix(r) : int64_t{0}, SumI(), sh));
  // Rank by (key desc, union id asc): the packed keys of distinct candidates are distinct.
  const int64_t packed = keep ? ensemble::sort_key(key, u) : kInt64Min;
  cand[c] = packed;  // candidates are no longer needed by anyone: reuse the array
  __syncthreads();
  int rank = 0;
  for (int j = 0; j < C; ++j) rank += cand[j] > packed;
  const int64_t kept = block_reduce(keep ? int64_t{1} : int64_t{0}, SumI(), sh);
  if (keep && rank < k) {
    probs[b * k + rank] = r * inv_z;
    union_ids[b * k + rank] = u;
  }
  if (c >= kept && c < k) {
    probs[b * k + c] = 0.0f;
    union_ids[b * k + c] = -1;
  }
}

dim3 tiles(const Args& a) {
  return dim3(static_cast<unsigned>((a.union_size + kThreads - 1) / kThreads), static_cast<unsigned>(a.batch));
}

}  // namespace

void model_stats(const Args& a, float* mx, int64_t* total, uintptr_t stream) {
  model_stats_kernel<<<dim3(a.batch, a.num_models), kThreads, 0, as_stream(stream)>>>(a, mx, total);
  check_launch("model_stats_kernel");
}

void union_pass(const Args& a, int mode, const float* mx, const float* inv_s, const float* kmax, float* out,
                float* tile_val, int64_t* tile_idx, uintptr_t stream) {
  union_pass_kernel<<<tiles(a), kThreads, 0, as_stream(stream)>>>(a, mode, mx, inv_s, kmax, out, tile_val, tile_idx);
  check_launch("union_pass_kernel");
}

void pick(const Args& a, const float* mx, const float* inv_s, const float* kmax, const int64_t* tile,
          const int64_t* base, const int64_t* target, int64_t* chosen, float* score, uintptr_t stream) {
  pick_kernel<<<a.batch, kThreads, 0, as_stream(stream)>>>(a, mx, inv_s, kmax, tile, base, target, chosen, score);
  check_launch("pick_kernel");
}

void scores(const Args& a, float* out, const float* kmax, int64_t* tile_sum, uintptr_t stream) {
  scores_kernel<<<tiles(a), kThreads, 0, as_stream(stream)>>>(a, out, kmax, tile_sum);
  check_launch("scores_kernel");
}

void scale(const Args& a, float* out, const float* inv_z, uintptr_t stream) {
  scale_kernel<<<tiles(a), kThreads, 0, as_stream(stream)>>>(a, out, inv_z);
  check_launch("scale_kernel");
}

void union_topk(const Args& a, int k, float* probs, int64_t* union_ids, uintptr_t stream) {
  topk_kernel<<<a.batch, kThreads, 0, as_stream(stream)>>>(a, k, probs, union_ids);
  check_launch("topk_kernel");
}

}  // namespace cuda
}  // namespace pyfuse
