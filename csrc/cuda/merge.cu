// pyfuse::merge_task_vectors on CUDA: the per-element math of pyfuse/merge.h, as on the CPU.
//
// Statistics, all on the stream (no host sync): per model, exact top-k thresholds of |x_i - base| with
// cuda/select.cuh (keys computed on the fly), turned into merge.h's (t, b) form by one thread; L1 sums in
// float64 over fixed tiles with a fixed-order block reduction, then summed per model in tile order. Fused
// pass: one thread per element recomputes each delta, mask and random number (twice when a sign election
// needs them before the combination), and writes the output once. DELLA ranks each element against its
// row on the fly (O(ncols) per element, no scratch). Device scratch: O(K) parameters + O(n / 2048) ints.
#include <vector>

#include "cuda/check.cuh"
#include "cuda/select.cuh"
#include "pyfuse/merge.h"

namespace pyfuse {
namespace cuda {
namespace {

using merge::Config;
using merge::Model;

constexpr int kThreads = 256;
constexpr int kL1Tile = 4096;  // elements per L1 partial sum

__device__ __forceinline__ float base_at(const Config& c, int64_t i) {
  return c.base == nullptr ? 0.0f : load_float(c.base, c.in_dtype, i);
}

// |x_i - base| bits of element i: the selection key.
struct DeltaKey {
  const void* x;
  const void* base;
  int32_t dtype;
  __device__ uint32_t operator()(int64_t i) const {
    const float b = base == nullptr ? 0.0f : load_float(base, dtype, i);
    return merge::magnitude_key(load_float(x, dtype, i) - b);
  }
};

// 0-based ascending rank of key within its row, ties to the lower column.
__device__ int64_t row_rank(const Config& c, const void* x, int64_t i, uint32_t key) {
  const int64_t col = i % c.ncols, start = i - col;
  int64_t rank = 0;
  for (int64_t l = 0; l < c.ncols; ++l) {
    const uint32_t other = merge::magnitude_key(load_float(x, c.in_dtype, start + l) - base_at(c, start + l));
    rank += (other < key) | ((other == key) & (l < col));
  }
  return rank;
}

__device__ float masked(const Config& c, const void* x, const Model& m, uint32_t mi, int64_t i, float b) {
  const float d = load_float(x, c.in_dtype, i) - b;
  if (m.keep_all) return d;
  uint32_t keep = 1;
  if (c.sparsify == merge::kMagnitude || c.sparsify == merge::kBreadcrumbs) {
    keep = merge::keep_top(m, merge::magnitude_key(d), i);
  } else if (c.sparsify == merge::kRandom) {
    keep = merge::keep_random(c.seed, i, mi, c.purpose, m.p_keep);
  } else if (c.sparsify == merge::kDella) {
    const float p = merge::della_prob(m, row_rank(c, x, i, merge::magnitude_key(d)), c.ncols);
    keep = merge::keep_random(c.seed, i, mi, c.purpose, p);
  }
  return merge::select(d, keep);
}

__global__ void __launch_bounds__(kThreads) fused_kernel(Config c, const void* const* x, const Model* models) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const bool vote = c.consensus != merge::kConsensusNone;
  const bool agree_q = c.normalize == merge::kAgreeWeight || c.normalize == merge::kAgreeCount;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < c.n; i += stride) {
    const float b = base_at(c, i);
    uint32_t flip = 0;
    if (vote) {
      float total = 0.0f;
      for (int32_t m = 0; m < c.k; ++m) {
        const float mk = masked(c, x[m], models[m], m, i, b);
        const float e = merge::election_input(models[m], mk, c.weighted);
        total = merge::add_rn(total, merge::election_term(e, c.consensus));
      }
      flip = merge::flip_of(total);
    }
    float acc = 0.0f;
    float q = c.normalize == merge::kAllWeight ? c.all_weight_q : 0.0f;
    for (int32_t m = 0; m < c.k; ++m) {
      const Model& md = models[m];
      const float mk = masked(c, x[m], md, m, i, b);
      const uint32_t a = vote ? merge::agrees(merge::election_input(md, mk, c.weighted), flip) : 1u;
      acc = merge::add_rn(acc, merge::select(merge::mul_rn(md.alpha, mk), a));
      if (agree_q) q = merge::add_rn(q, merge::select(merge::divisor_term(md, c.normalize), a));
    }
    store_float(c.out, c.out_dtype, i, merge::finish(acc, q, c.normalize, c.lam, b));
  }
}

// partial[(tile * k + m) * 2 + {0, 1}] = sum over the tile of |d_m| and |m_m|, fixed-order reduction.
__global__ void __launch_bounds__(kThreads) l1_kernel(Config c, const void* const* x, const Model* models,
                                                     double* partial) {
  __shared__ double sh[2][kThreads];
  const int64_t start = int64_t(blockIdx.x) * kL1Tile;
  for (int32_t m = 0; m < c.k; ++m) {
    double before = 0.0, after = 0.0;
    for (int64_t i = start + threadIdx.x; i < start + kL1Tile && i < c.n; i += kThreads) {
      const float b = base_at(c, i);
      before += fabs(double(load_float(x[m], c.in_dtype, i) - b));
      after += fabs(double(masked(c, x[m], models[m], m, i, b)));
    }
    sh[0][threadIdx.x] = before;
    sh[1][threadIdx.x] = after;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        sh[0][threadIdx.x] += sh[0][threadIdx.x + s];
        sh[1][threadIdx.x] += sh[1][threadIdx.x + s];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      partial[(blockIdx.x * int64_t(c.k) + m) * 2] = sh[0][0];
      partial[(blockIdx.x * int64_t(c.k) + m) * 2 + 1] = sh[1][0];
    }
    __syncthreads();
  }
}

// One thread per model: scale from the L1 partials (when given), then alpha = weight * scale.
__global__ void finalize_kernel(int32_t k, int64_t tiles, const double* partial, Model* models) {
  const int32_t m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= k) return;
  if (partial != nullptr) {
    double before = 0.0, after = 0.0;
    for (int64_t t = 0; t < tiles; ++t) {
      before += partial[(t * k + m) * 2];
      after += partial[(t * k + m) * 2 + 1];
    }
    models[m].scale = merge::l1_scale(before, after);
  }
  models[m].alpha = merge::mul_rn(models[m].weight, models[m].scale);
}

// One thread: select.cuh's (T, quota per tile) -> (t, b): ties at t are kept below flat index b.
__global__ void top_set_kernel(DeltaKey key_of, int64_t n, select::Workspace ws, int64_t tiles, uint32_t* t,
                               int64_t* b) {
  const int64_t key = ws.state[0], kept = ws.state[1], total = ws.state[2];
  *t = uint32_t(key);
  *b = INT64_MAX;
  if (kept == total) return;
  int64_t tile = 0;
  while (tile + 1 < tiles && ws.before[tile + 1] < kept) ++tile;
  int64_t need = kept - ws.before[tile];
  for (int64_t i = tile * select::kTile; i < n; ++i) {
    if (key_of(i) == uint32_t(key) && --need == 0) {
      *b = i + 1;
      return;
    }
  }
}

void top_set(const Config& c, const void* x, int64_t k, const select::Workspace& ws, uint32_t* t, int64_t* b,
             cudaStream_t stream) {
  const DeltaKey key_of{x, c.base, c.in_dtype};
  select::select_threshold(key_of, c.n, k, 31, ws, stream);
  top_set_kernel<<<1, 1, 0, stream>>>(key_of, c.n, ws, select::num_tiles(c.n), t, b);
  check_launch("top_set_kernel");
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return unsigned(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

}  // namespace

// Host vectors in; models arrive with weight, scale, p_keep, p_span, keep_all set; k_keep/k_drop give the
// top-set sizes for magnitude/breadcrumbs.
void merge_task_vectors(const Config& c, const std::vector<const void*>& x, std::vector<Model> models,
                        const std::vector<int64_t>& k_keep, const std::vector<int64_t>& k_drop,
                        uintptr_t stream_handle) {
  cudaStream_t stream = as_stream(stream_handle);
  const int64_t k = c.k, l1_tiles = (c.n + kL1Tile - 1) / kL1Tile;
  const bool top = c.sparsify == merge::kMagnitude || c.sparsify == merge::kBreadcrumbs;
  const bool l1 = c.rescale == merge::kL1;
  // One device allocation: models | pointers | selection workspace | L1 partials.
  const size_t models_bytes = k * sizeof(Model), ptr_bytes = k * sizeof(void*);
  const size_t ws_bytes = top ? select::workspace_bytes(c.n) : 0, l1_bytes = l1 ? l1_tiles * k * 2 * 8 : 0;
  // Empty and full top sets need no selection: (t, b) = (above every key, 0) or (0, everything).
  for (int64_t m = 0; m < k; ++m) {
    models[m].t_keep = k_keep[m] >= c.n ? 0u : UINT32_MAX;
    models[m].b_keep = k_keep[m] >= c.n ? INT64_MAX : 0;
    models[m].t_drop = k_drop[m] >= c.n ? 0u : UINT32_MAX;
    models[m].b_drop = k_drop[m] >= c.n ? INT64_MAX : 0;
  }
  char* mem = nullptr;
  check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&mem), models_bytes + ptr_bytes + ws_bytes + l1_bytes, stream),
             "cudaMallocAsync");
  Model* d_models = reinterpret_cast<Model*>(mem);
  const void** d_x = reinterpret_cast<const void**>(mem + models_bytes);
  char* ws_mem = mem + models_bytes + ptr_bytes;
  double* partial = l1 ? reinterpret_cast<double*>(ws_mem + ws_bytes) : nullptr;
  check_cuda(cudaMemcpyAsync(d_models, models.data(), models_bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  check_cuda(cudaMemcpyAsync(d_x, x.data(), ptr_bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  if (top) {
    const select::Workspace ws = select::workspace(ws_mem, c.n);
    for (int64_t m = 0; m < k; ++m) {
      if (models[m].keep_all) continue;
      Model& dm = d_models[m];  // device memory: only its field addresses are taken here
      if (0 < k_keep[m] && k_keep[m] < c.n) top_set(c, x[m], k_keep[m], ws, &dm.t_keep, &dm.b_keep, stream);
      if (0 < k_drop[m] && k_drop[m] < c.n) top_set(c, x[m], k_drop[m], ws, &dm.t_drop, &dm.b_drop, stream);
    }
  }
  if (l1) {
    l1_kernel<<<unsigned(l1_tiles), kThreads, 0, stream>>>(c, d_x, d_models, partial);
    check_launch("l1_kernel");
  }
  finalize_kernel<<<unsigned((k + 63) / 64), 64, 0, stream>>>(int32_t(k), l1_tiles, partial, d_models);
  check_launch("finalize_kernel");
  fused_kernel<<<grid_for(c.n), kThreads, 0, stream>>>(c, d_x, d_models);
  check_launch("fused_kernel");
  check_cuda(cudaFreeAsync(mem, stream), "cudaFreeAsync");
}

}  // namespace cuda
}  // namespace pyfuse
