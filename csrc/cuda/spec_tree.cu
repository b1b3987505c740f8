// Tree verification on CUDA: one block per batch row running the walk from pyfuse/spec_tree.h. Every thread
// follows the same control flow; passes over the vocabulary are block-wide and exact (int64 sums, first-index
// argmax), so the result equals the CPU kernel and the reference bit for bit.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/check.cuh"
#include "pyfuse/spec_tree.h"

namespace pyfuse {
namespace spec_tree {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // tokens per thread per sampling chunk
constexpr int64_t kNone = INT64_MAX;

struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return b < a ? b : a; }
};

struct ArgMax {
  float value;
  int64_t index;
};

// NaN never wins (comparisons are false); equal values keep the lower index.
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (b.value > a.value) return b;
    if (a.value > b.value) return a;
    return b.index < a.index ? b : a;
  }
};

using Reduce = cub::BlockReduce<int64_t, kThreads>;
using ReduceArgMax = cub::BlockReduce<ArgMax, kThreads>;
using Scan = cub::BlockScan<int64_t, kThreads>;

union TempStorage {
  typename Reduce::TempStorage reduce;
  typename ReduceArgMax::TempStorage argmax;
  typename Scan::TempStorage scan;
};

struct BlockVocab {
  int64_t vocab;
  int32_t dtype;
  TempStorage* temp;
  int64_t* shared;

  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }

  // Leader's reduction result to every thread; leaves the temp storage free for the next pass.
  __device__ int64_t broadcast(int64_t v) const {
    if (threadIdx.x == 0) *shared = v;
    __syncthreads();
    v = *shared;
    __syncthreads();
    return v;
  }

  __device__ int64_t argmax(const void* row) const {
    ArgMax best = {-INFINITY, kNone};
    for (int64_t x = threadIdx.x; x < vocab; x += kThreads) {
      const float v = load_float(row, dtype, x);
      if (v > best.value) best = {v, x};
    }
    const int64_t idx = broadcast(ReduceArgMax(temp->argmax).Reduce(best, ArgMaxOp()).index);
    return idx == kNone ? 0 : idx;
  }

  __device__ int64_t sum(const Weights& w) const {
    int64_t s = 0;
    for (int64_t x = threadIdx.x; x < vocab; x += kThreads) s += w(x);
    return broadcast(Reduce(temp->reduce).Sum(s));
  }

  __device__ int64_t sample(const Weights& w, double threshold) const {
    int64_t base = 0;
    for (int64_t start = 0; start < vocab; start += kThreads * kItems) {
      const int64_t x0 = start + static_cast<int64_t>(threadIdx.x) * kItems;
      int64_t items[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) items[i] = x0 + i < vocab ? w(x0 + i) : 0;
      int64_t chunk;
      Scan(temp->scan).InclusiveSum(items, items, chunk);
      int64_t hit = kNone;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        if (x0 + i < vocab && static_cast<double>(base + items[i]) > threshold) hit = x0 + i;
      }
      __syncthreads();
      const int64_t first = broadcast(Reduce(temp->reduce).Reduce(hit, MinOp()));
      if (first != kNone) return first;
      base += chunk;
    }
    return vocab - 1;  // only for an invalid injected uniform (>= 1 or NaN), as the reference
  }
};

__global__ void __launch_bounds__(kThreads, 1) verify_tree_kernel(Batch a) {
  __shared__ TempStorage temp;
  __shared__ int64_t shared;
  BlockVocab vocab = {a.vocab, a.dtype, &temp, &shared};
  walk(make_row(a, blockIdx.x), vocab);
}

}  // namespace

namespace cuda {

void verify_tree(const Batch& a, uintptr_t stream) {
  if (a.batch == 0) return;
  verify_tree_kernel<<<static_cast<unsigned>(a.batch), kThreads, 0, as_stream(stream)>>>(a);
  check_launch("verify_tree_kernel");
}

}  // namespace cuda
}  // namespace spec_tree
}  // namespace pyfuse
