// One binder list per extension module: this file is compiled into both _C and _C_cuda.
#include "registry.h"

namespace pyfuse {
std::vector<Binder>& binders() {
  static std::vector<Binder> list;  // function-local: safe to use from other files' static initializers
  return list;
}
}  // namespace pyfuse
