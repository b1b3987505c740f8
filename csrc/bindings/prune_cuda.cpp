#include <stddef.h>
#include <stdint.h>

#include "registry.h"

// Defined in csrc/cuda/prune.cu.
namespace pyfuse {
namespace cuda {
size_t select_workspace_bytes(int64_t n);
void magnitude_prune(const void* x, void* out, int64_t n, int32_t dtype, int64_t k, void* workspace,
                     uintptr_t cuda_stream);
void random_prune(const void* x, void* out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
                  uint32_t purpose, uintptr_t cuda_stream);
}  // namespace cuda
}  // namespace pyfuse

PYFUSE_BINDINGS(prune) {
  m.def("select_workspace_bytes", &pyfuse::cuda::select_workspace_bytes,
        "Device bytes magnitude_prune needs as workspace for n elements.");
  m.def(
      "magnitude_prune",
      [](uintptr_t x, uintptr_t out, int64_t n, int32_t dtype, int64_t k, uintptr_t workspace, uintptr_t stream) {
        pyfuse::cuda::magnitude_prune(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), n, dtype, k,
                                      reinterpret_cast<void*>(workspace), stream);
      },
      PYFUSE_NOGIL, "Keep the k entries of largest |x| (ties: lowest flat index) on cuda_stream; x may equal out.");
  m.def(
      "random_prune",
      [](uintptr_t x, uintptr_t out, int64_t n, int32_t dtype, float density, bool rescale, uint64_t seed,
         uint32_t purpose, uintptr_t stream) {
        pyfuse::cuda::random_prune(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), n, dtype, density,
                                   rescale, seed, purpose, stream);
      },
      PYFUSE_NOGIL, "Keep x[i] iff Philox uniform (seed, i, 0, purpose) < density, optionally / density.");
}
