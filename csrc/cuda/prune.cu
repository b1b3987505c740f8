// pyfuse.magnitude_prune and pyfuse.random_prune on CUDA. Magnitude: threshold from select.cuh, then one
// write pass deciding each element exactly with select::keep_flags. Random: one pass, one Philox uniform
// per flat index. x may equal out (the op copies non-contiguous inputs into out first).
#include "cuda/check.cuh"
#include "cuda/select.cuh"
#include "pyfuse/common.h"
#include "pyfuse/philox.h"

namespace pyfuse {
namespace cuda {
namespace {

template <class Bits>
struct AbsKey {
  const Bits* x;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const {
    return uint32_t(x[i]) & (sizeof(Bits) == 4 ? 0x7fffffffu : 0x7fffu);
  }
};

template <class Bits>
__global__ void __launch_bounds__(select::kThreads)
    magnitude_prune_kernel(const Bits* x, Bits* out, int64_t n, select::Workspace ws) {
  __shared__ select::TempStorage temp;
  const int64_t first = int64_t(blockIdx.x) * select::kTile + int64_t(threadIdx.x) * select::kItems;
  const AbsKey<Bits> key_of{x};
  uint32_t keys[select::kItems];
  bool valid[select::kItems], keep[select::kItems];
  for (int j = 0; j < select::kItems; ++j) {
    valid[j] = first + j < n;
    keys[j] = valid[j] ? key_of(first + j) : 0u;
  }
  select::keep_flags(keys, valid, ws, blockIdx.x, keep, temp);
  for (int j = 0; j < select::kItems; ++j) {
    if (valid[j]) out[first + j] = keep[j] ? x[first + j] : Bits(0);
  }
}

template <int32_t kDtype>
__global__ void random_prune_kernel(const void* x, void* out, int64_t n, float density, bool rescale, uint64_t seed,
                                    uint32_t purpose) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float u = philox::uniform(seed, uint64_t(i), 0u, purpose);
    const float v = load_float(x, kDtype, i);
    const float r = rescale ? __fdiv_rn(v, density) : v;
    store_float(out, kDtype, i, u < density ? r : 0.0f);
  }
}

}  // namespace

size_t select_workspace_bytes(int64_t n) { return select::workspace_bytes(n); }

// Keeps the k entries of largest |x| (ties: lowest flat index); workspace of select_workspace_bytes(n).
void magnitude_prune(const void* x, void* out, int64_t n, int32_t dtype, int64_t k, void* workspace,
                     uintptr_t cuda_stream) {
  if (n == 0) return;
  const cudaStream_t stream = as_stream(cuda_stream);
  const select::Workspace ws = select::workspace(workspace, n);
  const unsigned tiles = unsigned(select::num_tiles(n));
  if (dtype == kFloat32) {
    const uint32_t* xb = static_cast<const uint32_t*>(x);
    select::select_threshold(AbsKey<uint32_t>{xb}, n, k, 31, ws, stream);
    magnitude_prune_kernel<<<tiles, select::kThreads, 0, stream>>>(xb, static_cast<uint32_t*>(out), n, ws);
  } else {
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    select::select_threshold(AbsKey<uint16_t>{xb}, n, k, 15, ws, stream);
    magnitude_prune_kernel<<<tiles, select::kThreads, 0, stream>>>(xb, static_cast<uint16_t*>(out), n, ws);
  }
  check_launch("magnitude_prune_kernel");
}

void random_prune(const void* x, void* out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
                  uint32_t purpose, uintptr_t cuda_stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  const unsigned grid = unsigned(blocks < 65535 * 16 ? blocks : 65535 * 16);
  const cudaStream_t stream = as_stream(cuda_stream);
  if (dtype == kFloat32) {
    random_prune_kernel<kFloat32><<<grid, threads, 0, stream>>>(x, out, n, density, rescale, seed, purpose);
  } else if (dtype == kFloat16) {
    random_prune_kernel<kFloat16><<<grid, threads, 0, stream>>>(x, out, n, density, rescale, seed, purpose);
  } else {
    random_prune_kernel<kBFloat16><<<grid, threads, 0, stream>>>(x, out, n, density, rescale, seed, purpose);
  }
  check_launch("random_prune_kernel");
}

}  // namespace cuda
}  // namespace pyfuse
