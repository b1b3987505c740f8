#include <pybind11/stl.h>

#include <vector>

#include "merge_args.h"
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
  pyfuse::merge::Call c = pyfuse::merge::make_call(out, base, x, n, ncols, in_dtype, out_dtype, weights,
                                                 scales, keep_all, p_keep, p_span, sparsify, rescale,
                                                 consensus, weighted, normalize, all_weight_q, lam, seed,
                                                 purpose);
  pyfuse::cuda::merge_task_vectors(c.config, c.inputs, c.models, k_keep, k_drop, stream);
}

}  // namespace

PYFUSE_BINDINGS(merge) {
  m.def("merge_task_vectors", &merge_task_vectors, PYFUSE_NOGIL,
        "Fused merge of K task vectors (pyfuse::merge_task_vectors) on cuda_stream; device pointers.");
}
