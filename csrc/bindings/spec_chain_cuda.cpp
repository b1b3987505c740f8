#include "pyfuse/spec_chain.h"
#include "registry.h"

PYFUSE_BINDINGS(spec_chain) {
  m.def(
      "spec_chain_verify",
      [](PYFUSE_SPEC_CHAIN_PARAMS, uintptr_t stream) {
        pyfuse::cuda::spec_chain_verify(PYFUSE_SPEC_CHAIN_ARGS, stream);
      },
      PYFUSE_NOGIL, "Chain verification (mode 0 greedy, 1 rejection, 2 typical) on a CUDA stream.");
}
