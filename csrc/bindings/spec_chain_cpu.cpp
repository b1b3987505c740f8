#include "pyfuse/spec_chain.h"
#include "registry.h"

PYFUSE_BINDINGS(spec_chain) {
  m.def(
      "spec_chain_verify",
      [](PYFUSE_SPEC_CHAIN_PARAMS) { pyfuse::cpu::spec_chain_verify(PYFUSE_SPEC_CHAIN_ARGS); }, PYFUSE_NOGIL,
      "Chain verification (mode 0 greedy, 1 rejection, 2 typical); see pyfuse/spec/chain.py.");
}
