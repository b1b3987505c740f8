#include <pybind11/stl.h>

#include <vector>

#include "pyfuse/merge.h"
#include "registry.h"

namespace pyfuse {
namespace cuda {
void merge_task_vectors(const merge::Config& c, const std::vector<const void*>& x, std::vector<merge::Model> models,
                        const std::vector<int64_t>& k_keep, const std::vector<int64_t>& k_drop, uintptr_t stream);
}  // namespace cuda
}  // namespace pyfuse

namespace {

// Argument order: pyfuse/merge/op.py kernel_args(), then the CUDA stream.
void merge_task_vectors(uintptr_t out, uintptr_t base, const std::vector<uintptr_t>& x, int64_t n, int64_t ncols,
                        int32_t in_dtype, int32_t out_dtype, const std::vector<float>& weights,
                        const std::vector<float>& scales, const std::vector<bool>& keep_all,
                        const std::vector<int64_t>& k_keep, const std::vector<int64_t>& k_drop,
                        const std::vector<float>& p_keep, const std::vector<float>& p_span, int32_t sparsify,
                        int32_t rescale, int32_t consensus, bool weighted, int32_t normalize, float all_weight_q,
                        float lam, uint64_t seed, uint32_t purpose, uintptr_t stream) {
  const int32_t k = static_cast<int32_t>(x.size());
  pyfuse::merge::Config c{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(base), n, ncols, k,
                          in_dtype, out_dtype, sparsify, rescale, consensus, normalize, weighted, all_weight_q,
                          lam, seed, purpose};
  std::vector<const void*> ptrs(k);
  std::vector<pyfuse::merge::Model> models(k);
  for (int32_t i = 0; i < k; ++i) {
    ptrs[i] = reinterpret_cast<const void*>(x[i]);
    models[i] = pyfuse::merge::Model{weights[i], scales[i], 0.0f, p_keep[i], p_span[i], 0, 0, 0, 0, keep_all[i]};
  }
  pyfuse::cuda::merge_task_vectors(c, ptrs, models, k_keep, k_drop, stream);
}

}  // namespace

PYFUSE_BINDINGS(merge) {
  m.def("merge_task_vectors", &merge_task_vectors, PYFUSE_NOGIL,
        "Fused merge of K task vectors (pyfuse::merge_task_vectors) on cuda_stream; device pointers.");
}
