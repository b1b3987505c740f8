// Unpacks the argument list of pyfuse/merge/op.py kernel_args() into the kernel's Config and per-model
// structs; shared by the CPU and CUDA bindings, which differ only in the launcher they call.
#pragma once

#include <vector>

#include "pyfuse/merge.h"

namespace pyfuse {
namespace merge {

struct Call {
  Config config;
  std::vector<const void*> inputs;
  std::vector<Model> models;
};

inline Call make_call(uintptr_t out, uintptr_t base, const std::vector<uintptr_t>& x, int64_t n, int64_t ncols,
                      int32_t in_dtype, int32_t out_dtype, const std::vector<float>& weights,
                      const std::vector<float>& scales, const std::vector<bool>& keep_all,
                      const std::vector<float>& p_keep, const std::vector<float>& p_span, int32_t sparsify,
                      int32_t rescale, int32_t consensus, bool weighted, int32_t normalize, float all_weight_q,
                      float lam, uint64_t seed, uint32_t purpose) {
  const int32_t k = static_cast<int32_t>(x.size());
  Call call{Config{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(base), n, ncols, k, in_dtype,
                   out_dtype, sparsify, rescale, consensus, normalize, weighted, all_weight_q, lam, seed, purpose},
            std::vector<const void*>(k), std::vector<Model>(k)};
  for (int32_t i = 0; i < k; ++i) {
    call.inputs[i] = reinterpret_cast<const void*>(x[i]);
    call.models[i] = Model{weights[i], scales[i], 0.0f, p_keep[i], p_span[i], 0, 0, 0, 0, keep_all[i]};
  }
  return call;
}

}  // namespace merge
}  // namespace pyfuse
