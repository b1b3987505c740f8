// pyfuse._C_cuda: the CUDA kernels. Every csrc/bindings/*_cuda.cpp adds its functions via PYFUSE_BINDINGS.
#include <cuda_runtime.h>

#include "registry.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyfuse CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return n;
  });
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  for (auto bind : pyfuse::binders()) bind(m);
}
