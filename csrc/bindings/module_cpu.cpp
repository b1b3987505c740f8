// pyfuse._C: the CPU kernels. Every csrc/bindings/*_cpu.cpp adds its functions via PYFUSE_BINDINGS.
#include <omp.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfuse CPU kernels (C++17, OpenMP; raw pointers, no libtorch)";
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
  m.def("cpu_features", []() {
    __builtin_cpu_init();
    pybind11::dict d;
    d["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
    d["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
    return d;
  });
  for (auto bind : pyfuse::binders()) bind(m);
}
