#include "spec_tree_args.h"
#include "registry.h"

PYFUSE_BINDINGS(spec_tree) {
  m.def(
      "verify_tree",
      [](uintptr_t candidates, uintptr_t next_token, uintptr_t next_sibling, uintptr_t target, uintptr_t draft,
         int32_t dtype, int64_t batch, int64_t n, int64_t vocab, int64_t batch_stride, int64_t node_stride,
         int32_t mode, int64_t max_depth, uintptr_t seeds, int32_t row_streams, uintptr_t uniforms,
         uintptr_t final_uniforms, uintptr_t work, uintptr_t accept_index, uintptr_t accept_len,
         uintptr_t token_ids, uintptr_t bonus, uintptr_t cuda_stream) {
        namespace st = pyfuse::spec_tree;
        const st::Batch a = st::make_batch(candidates, next_token, next_sibling, target, draft, dtype, batch, n,
                                           vocab, batch_stride, node_stride, mode, max_depth, seeds,
                                           row_streams, uniforms, final_uniforms, work, accept_index,
                                           accept_len, token_ids, bonus);
        st::cuda::verify_tree(a, cuda_stream);
      },
      PYFUSE_NOGIL,
      "Tree verification on cuda_stream (device pointers); arguments as in the cpu binding.");
}
