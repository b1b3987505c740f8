// Chain verification on CUDA: one thread block per request. Every thread runs the accept loop of
// pyfuse/spec_chain.h in lockstep; the vocabulary-wide reductions are block-collective (CUB, fixed tree
// order for a fixed block size), and their results are broadcast so all threads take the same branch.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/check.cuh"
#include "pyfuse/spec_chain.h"

namespace pyfuse {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct ArgMax {
  float v;
  int64_t i;
};

// Larger value wins; equal values: lower index (the CPU's first-occurrence argmax).
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& x, const ArgMax& y) const {
    return (y.v > x.v || (y.v == x.v && y.i < x.i)) ? y : x;
  }
};

struct MaxOp {
  __device__ float operator()(float x, float y) const { return y > x ? y : x; }
};

struct Shared {
  union {
    cub::BlockReduce<float, kThreads>::TempStorage f;
    cub::BlockReduce<int64_t, kThreads>::TempStorage i;
    cub::BlockReduce<ArgMax, kThreads>::TempStorage am;
    cub::BlockScan<int64_t, kThreads>::TempStorage scan;
  } tmp;
  float f;
  int64_t i;
};

class BlockReducer {
 public:
  __device__ BlockReducer(const spec::ChainArgs& a, Shared& sh) : a_(a), sh_(sh) {}

  __device__ spec::ProbRow row(const void* ptr, int32_t dtype, int32_t logits, int64_t off) {
    spec::ProbRow r{ptr, dtype, logits, a_.temperature, off, 0.0f, 1.0f};
    if (!logits) return r;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) {
      const float l = r.raw(j);
      m = l > m ? l : m;
    }
    r.m = broadcast(cub::BlockReduce<float, kThreads>(sh_.tmp.f).Reduce(m, MaxOp()));
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) s += expf((r.raw(j) - r.m) / a_.temperature);
    r.s = broadcast(cub::BlockReduce<float, kThreads>(sh_.tmp.f).Sum(s));
    return r;
  }

  __device__ int64_t argmax(const spec::ProbRow& r) {
    ArgMax best{-INFINITY, 0};
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) {
      const float v = r.raw(j);
      if (v > best.v) best = ArgMax{v, j};
    }
    const ArgMax m = cub::BlockReduce<ArgMax, kThreads>(sh_.tmp.am).Reduce(best, ArgMaxOp());
    return broadcast64(m.i);
  }

  __device__ float entropy(const spec::ProbRow& r) {
    float h = 0.0f;
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) {
      const float p = r.prob(j);
      if (p > 0.0f) h -= p * logf(p);
    }
    return broadcast(cub::BlockReduce<float, kThreads>(sh_.tmp.f).Sum(h));
  }

  __device__ int64_t inverse_cdf(const spec::ProbRow& p, const spec::ProbRow* q, int64_t x, float u) {
    const auto weight = [&](int64_t j) { return spec::residual_weight(p, q, x, j); };
    int64_t local = 0;
    for (int64_t j = threadIdx.x; j < a_.vocab; j += kThreads) local += weight(j);
    const int64_t total = broadcast64(cub::BlockReduce<int64_t, kThreads>(sh_.tmp.i).Sum(local));
    if (total == 0) return -1;
    const int64_t thr = spec::sample_threshold(u, total);
    // Count the prefix sums <= thr, tile by tile; stop once a tile's end passes thr (same for all threads).
    int64_t count = 0, running = 0;
    for (int64_t start = 0; start < a_.vocab && running <= thr; start += kThreads) {
      const int64_t j = start + threadIdx.x;
      const int64_t w = j < a_.vocab ? weight(j) : 0;
      int64_t incl, tile;
      cub::BlockScan<int64_t, kThreads>(sh_.tmp.scan).InclusiveSum(w, incl, tile);
      __syncthreads();
      if (j < a_.vocab && running + incl <= thr) ++count;
      running += tile;
    }
    count = broadcast64(cub::BlockReduce<int64_t, kThreads>(sh_.tmp.i).Sum(count));
    return count < a_.vocab ? count : a_.vocab - 1;
  }

 private:
  // Thread 0 holds a CUB reduction's result; hand it to every thread (the second barrier also frees the
  // temp storage for the next collective).
  __device__ float broadcast(float v) {
    if (threadIdx.x == 0) sh_.f = v;
    __syncthreads();
    v = sh_.f;
    __syncthreads();
    return v;
  }
  __device__ int64_t broadcast64(int64_t v) {
    if (threadIdx.x == 0) sh_.i = v;
    __syncthreads();
    v = sh_.i;
    __syncthreads();
    return v;
  }

  const spec::ChainArgs& a_;
  Shared& sh_;
};

__global__ void __launch_bounds__(kThreads) spec_chain_kernel(const spec::ChainArgs args) {
  __shared__ Shared sh;
  BlockReducer reducer(args, sh);
  spec::verify_request(args, static_cast<int64_t>(blockIdx.x), reducer, threadIdx.x == 0);
}

}  // namespace

void spec_chain_verify(const spec::ChainArgs& args, uintptr_t stream) {
  if (args.batch == 0) return;
  spec_chain_kernel<<<static_cast<unsigned>(args.batch), kThreads, 0, as_stream(stream)>>>(args);
  check_launch("spec_chain_kernel");
}

}  // namespace cuda
}  // namespace pyfuse
