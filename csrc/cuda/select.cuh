// Exact top-k threshold selection on the GPU, without sorting: radix select, 8 key bits per pass,
// shared-memory block histograms added into global memory with integer atomics (exact, so
// deterministic), no host sync. Same rule and key convention as csrc/cpu/select.h and kernels/select.py.
//
// API (stable: prune.cu and the merge kernels use it)
// -------------------------------------------------------------------------------------------------
// KeyFn: copyable functor, `__device__ uint32_t operator()(int64_t i) const`, keys < 2^kKeyBits
//   (float32 |x|: bits & 0x7fffffff, 31 bits; float16/bfloat16 |x|: bits & 0x7fff, 15 bits).
//
//   size_t bytes = select::workspace_bytes(n);          // caller allocates (device memory)
//   select::Workspace ws = select::workspace(ptr, n);
//   select::select_threshold(key, n, k, key_bits, ws, stream);
//
// Afterwards ws.state = {T, equal_kept, equal_total, 0} and ws.before[j] = keys == T in tiles < j, tiles
// being [j*kTile, (j+1)*kTile). A fused pass with one block of kThreads threads per tile, thread t
// owning the kItems consecutive elements tile*kTile + t*kItems + [0, kItems), decides them exactly with
//   select::keep_flags(keys, valid, ws, tile, keep, temp)   (all threads of the block must call it).
// k == 0 gives T = 2^31 (matches no key); k >= n gives T = 0 with every element kept.
// Kernels that are not templates are static: several .cu files may include this header.
#pragma once

#include <cub/block/block_scan.cuh>

#include "cuda/check.cuh"

namespace pyfuse {
namespace select {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kRadixBits = 8;
constexpr int kRadix = 1 << kRadixBits;

struct Workspace {
  int64_t* state;               // [T, equal_kept, equal_total, 0]
  unsigned long long* hist;     // [kRadix]
  int64_t* before;              // [tiles]
};

inline int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }
inline size_t workspace_bytes(int64_t n) { return size_t(4 + kRadix + num_tiles(n)) * 8; }
inline Workspace workspace(void* p, int64_t) {
  int64_t* base = static_cast<int64_t*>(p);
  return Workspace{base, reinterpret_cast<unsigned long long*>(base + 4), base + 4 + kRadix};
}

using BlockScan = cub::BlockScan<int, kThreads>;
using TempStorage = typename BlockScan::TempStorage;

// Adds the histogram of digit (key >> shift) & 255 over the keys whose higher bits equal state[0].
template <class KeyFn>
__global__ void __launch_bounds__(kThreads) radix_hist_kernel(KeyFn key_of, int64_t n, const int64_t* state,
                                                             unsigned long long* hist, int shift, bool first) {
  __shared__ unsigned int sh[kRadix];
  sh[threadIdx.x] = 0;  // kThreads == kRadix
  __syncthreads();
  const int64_t prefix = first ? 0 : state[0];
  const int64_t base = int64_t(blockIdx.x) * kTile;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + int64_t(j) * kThreads + threadIdx.x;  // coalesced; order is irrelevant here
    if (i >= n) break;
    const uint32_t key = key_of(i);
    if (first || int64_t(key >> (shift + kRadixBits)) == prefix) atomicAdd(&sh[(key >> shift) & (kRadix - 1)], 1u);
  }
  __syncthreads();
  if (sh[threadIdx.x]) atomicAdd(&hist[threadIdx.x], (unsigned long long)sh[threadIdx.x]);
}

// One thread: picks the digit holding the need-th largest key, extends the prefix, clears hist.
static __global__ void radix_pick_kernel(int64_t* state, unsigned long long* hist, int64_t k, bool first) {
  const int64_t prefix = first ? 0 : state[0];
  const int64_t need = first ? k : state[1];
  int64_t above = 0;
  int bin = 0;
  for (int b = kRadix - 1; b >= 0; --b) {
    const int64_t h = int64_t(hist[b]);
    if (above + h >= need) {
      bin = b;
      break;
    }
    above += h;
  }
  state[0] = prefix * kRadix + bin;
  state[1] = need - above;
  state[2] = int64_t(hist[bin]);
  for (int b = 0; b < kRadix; ++b) hist[b] = 0;
}

static __global__ void fill_state_kernel(int64_t* state, int64_t t, int64_t kept) {
  state[0] = t;
  state[1] = kept;
  state[2] = 0;
  state[3] = 0;
}

template <class KeyFn>
__global__ void __launch_bounds__(kThreads) equal_count_kernel(KeyFn key_of, int64_t n, const int64_t* state,
                                                              int64_t* counts) {
  __shared__ unsigned int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  const int64_t t = state[0], base = int64_t(blockIdx.x) * kTile;
  unsigned int cnt = 0;
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + int64_t(j) * kThreads + threadIdx.x;
    if (i < n && int64_t(key_of(i)) == t) ++cnt;
  }
  if (cnt) atomicAdd(&total, cnt);
  __syncthreads();
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// One block, in place: counts[j] <- sum of counts[i < j] (a tile holds at most kTile equal keys).
static __global__ void __launch_bounds__(kThreads) exclusive_scan_kernel(int64_t* counts, int64_t m) {
  __shared__ TempStorage temp;
  __shared__ int64_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t start = 0; start < m; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    const int c = i < m ? int(counts[i]) : 0;
    int excl, sum;
    BlockScan(temp).ExclusiveSum(c, excl, sum);
    if (i < m) counts[i] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += sum;
    __syncthreads();
  }
}

// keep[j] for this thread's kItems consecutive elements of the tile (blocked arrangement).
__device__ __forceinline__ void keep_flags(const uint32_t (&keys)[kItems], const bool (&valid)[kItems],
                                           const Workspace& ws, int64_t tile, bool (&keep)[kItems],
                                           TempStorage& temp) {
  const int64_t t = ws.state[0];
  const int64_t quota = max(int64_t(0), ws.state[1] - ws.before[tile]);
  int eq = 0;
  for (int j = 0; j < kItems; ++j) eq += valid[j] && int64_t(keys[j]) == t;
  int rank;
  BlockScan(temp).ExclusiveSum(eq, rank);  // equal keys before this thread's elements in the tile
  for (int j = 0; j < kItems; ++j) {
    const bool is_eq = valid[j] && int64_t(keys[j]) == t;
    keep[j] = valid[j] && (int64_t(keys[j]) > t || (is_eq && rank < quota));
    rank += is_eq;
  }
}

template <class KeyFn>
void select_threshold(KeyFn key_of, int64_t n, int64_t k, int key_bits, const Workspace& ws, cudaStream_t stream) {
  const int64_t tiles = num_tiles(n);
  if (k <= 0 || k >= n) {  // no selection: T above every key, or T = 0 with all ties kept
    fill_state_kernel<<<1, 1, 0, stream>>>(ws.state, k <= 0 ? (int64_t(1) << 31) : 0, k <= 0 ? 0 : n);
    check_launch("fill_state_kernel");
    check_cuda(cudaMemsetAsync(ws.before, 0, size_t(tiles) * 8, stream), "cudaMemsetAsync");
    return;
  }
  check_cuda(cudaMemsetAsync(ws.hist, 0, kRadix * 8, stream), "cudaMemsetAsync");
  bool first = true;
  for (int shift = (key_bits - 1) / kRadixBits * kRadixBits; shift >= 0; shift -= kRadixBits) {
    radix_hist_kernel<<<unsigned(tiles), kThreads, 0, stream>>>(key_of, n, ws.state, ws.hist, shift, first);
    check_launch("radix_hist_kernel");
    radix_pick_kernel<<<1, 1, 0, stream>>>(ws.state, ws.hist, k, first);
    check_launch("radix_pick_kernel");
    first = false;
  }
  equal_count_kernel<<<unsigned(tiles), kThreads, 0, stream>>>(key_of, n, ws.state, ws.before);
  check_launch("equal_count_kernel");
  exclusive_scan_kernel<<<1, kThreads, 0, stream>>>(ws.before, tiles);
  check_launch("exclusive_scan_kernel");
}

}  // namespace select
}  // namespace pyfuse
