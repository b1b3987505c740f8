// pyfuse.rand on CUDA: the same counter scheme as the CPU kernel, one element per thread.
#include "cuda/check.cuh"
#include "pyfuse/philox.h"

namespace pyfuse {
namespace cuda {

__global__ void rand_uniform_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = philox::uniform(seed, offset + static_cast<uint64_t>(i), stream, 0);
  }
}

void rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream, uintptr_t cuda_stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  rand_uniform_kernel<<<grid, threads, 0, as_stream(cuda_stream)>>>(out, n, seed, offset, stream);
  check_launch("rand_uniform_kernel");
}

}  // namespace cuda
}  // namespace pyfuse
