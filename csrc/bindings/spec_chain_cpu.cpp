#include "pyfuse/spec_chain.h"
#include "registry.h"

PYFUSE_BINDINGS(spec_chain) {
  m.def(
      "spec_chain_verify",
      [](PYFUSE_SPEC_CHAIN_PARAMS) { pyfuse::cpu::spec_chain_verify(PYFUSE_SPEC_CHAIN_ARGS); }, PYFUSE_NOGIL,
      "Chain verification (mode 0 greedy, 1 rejection, 2 typical); see pyfuse/spec/chain.py.");
  m.def(
      "spec_check_probs",
      [](uintptr_t p, int64_t outer, int64_t inner, int64_t s_outer, int64_t s_inner, int64_t vocab) {
        float out[2];
        pyfuse::cpu::spec_check_probs(reinterpret_cast<const float*>(p), outer, inner, s_outer, s_inner, vocab, out);
        return std::make_pair(out[0], out[1]);
      },
      PYFUSE_NOGIL, "(max |row sum - 1|, min entry) of float32 probability rows, in one pass.");
}
