#include "cuda/philox.h"
#include "registry.h"

PYFUSE_BINDINGS(philox) {
  m.def(
      "rand_uniform",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream, uintptr_t cuda_stream) {
        pyfuse::cuda::rand_uniform(reinterpret_cast<float*>(out), n, seed, offset, stream, cuda_stream);
      },
      PYFUSE_NOGIL, "Fill float32 out[n] (device memory) with Philox uniforms, on cuda_stream.");
}
