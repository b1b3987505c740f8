// Lets each family's binding file add its functions to the extension module without editing a shared
// file: PYFUSE_BINDINGS(name) { m.def(...); } registers a function that the module's init runs.
// Static registrars run when the shared library is loaded, before PyInit_<module>.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace pyfuse {

using Binder = void (*)(pybind11::module_&);

// Defined once per extension module (module_cpu.cpp / module_cuda.cpp).
std::vector<Binder>& binders();

struct BinderRegistration {
  explicit BinderRegistration(Binder b) { binders().push_back(b); }
};

}  // namespace pyfuse

#define PYFUSE_BINDINGS(name)                                                             \
  static void pyfuse_bind_##name(pybind11::module_& m);                                   \
  static ::pyfuse::BinderRegistration pyfuse_bind_reg_##name(&pyfuse_bind_##name);         \
  static void pyfuse_bind_##name(pybind11::module_& m)

// Keyword-friendly shorthand used by the binding files.
#define PYFUSE_NOGIL pybind11::call_guard<pybind11::gil_scoped_release>()
