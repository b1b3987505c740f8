#include <stdint.h>

#include <tuple>

#include "registry.h"

// Defined in csrc/cpu/spec_validate.cpp.
namespace pyfuse {
namespace cpu {
void spec_check_rows(const void* p, int32_t dtype, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t vocab,
                     bool logits, double* out);
}  // namespace cpu
}  // namespace pyfuse

PYFUSE_BINDINGS(spec_validate) {
  m.def(
      "spec_check_rows",
      [](uintptr_t p, int32_t dtype, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t vocab, bool logits) {
        double out[4];
        {
          pybind11::gil_scoped_release nogil;
          pyfuse::cpu::spec_check_rows(reinterpret_cast<const void*>(p), dtype, n0, s0, n1, s1, vocab, logits, out);
        }
        return std::make_tuple(out[0], static_cast<int64_t>(out[1]), out[2], static_cast<int64_t>(out[3]));
      },
      "Row checks of a [n0, n1, vocab] probability / logit tensor: (worst, its row, min, its row); see "
      "pyfuse/spec/validate.py.");
}
