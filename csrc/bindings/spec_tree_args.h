// Builds the spec_tree::Batch from the pointer/size list of pyfuse/spec/tree.py; shared by the CPU and
// CUDA bindings, which differ only in the launcher they call.
#pragma once

#include "pyfuse/spec_tree.h"

namespace pyfuse {
namespace spec_tree {

inline Batch make_batch(uintptr_t candidates, uintptr_t next_token, uintptr_t next_sibling, uintptr_t target,
                        uintptr_t draft, int32_t dtype, int64_t batch, int64_t n, int64_t vocab,
                        int64_t batch_stride, int64_t node_stride, int32_t mode, int64_t max_depth,
                        uintptr_t seeds, int32_t row_streams, uintptr_t uniforms, uintptr_t final_uniforms,
                        uintptr_t work, uintptr_t accept_index, uintptr_t accept_len, uintptr_t token_ids,
                        uintptr_t bonus) {
  return Batch{reinterpret_cast<const int64_t*>(candidates), reinterpret_cast<const int64_t*>(next_token),
               reinterpret_cast<const int64_t*>(next_sibling), reinterpret_cast<const void*>(target),
               reinterpret_cast<const void*>(draft), dtype, batch, n, vocab, batch_stride, node_stride, mode,
               max_depth, reinterpret_cast<const int64_t*>(seeds), row_streams,
               reinterpret_cast<const float*>(uniforms), reinterpret_cast<const float*>(final_uniforms),
               reinterpret_cast<double*>(work), reinterpret_cast<int32_t*>(accept_index),
               reinterpret_cast<int32_t*>(accept_len), reinterpret_cast<int32_t*>(token_ids),
               reinterpret_cast<int32_t*>(bonus)};
}

}  // namespace spec_tree
}  // namespace pyfuse
