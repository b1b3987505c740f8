// pyfuse._C: the CPU kernels. Every csrc/bindings/*_cpu.cpp adds its functions via PYFUSE_BINDINGS.
#include <omp.h>
#include <sys/mman.h>

#include "cpu/avx512_paths.h"
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
  m.def(
      "advise_hugepages",
      [](uintptr_t ptr, size_t bytes) {
        // Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched buffer: its
        // first-touch page faults then cost 1/512 as many (THP "madvise" mode, the common default).
        const uintptr_t huge = uintptr_t(1) << 21;
        const uintptr_t begin = (ptr + huge - 1) & ~(huge - 1), end = (ptr + bytes) & ~(huge - 1);
        if (end <= begin) return false;
        return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
      },
      "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [ptr, ptr + bytes); False when not applicable.");
  m.def("set_avx512_paths", &pyfuse::cpu::set_avx512_paths, pybind11::arg("enabled"),
        "Turn the kernels written with AVX-512 intrinsics (magnitude_prune and merge band sweeps, ensemble "
        "exponential sums) on or off (off: the portable paths, for the tests); returns the previous setting. "
        "No effect on a CPU without AVX-512.");
  m.def("avx512_paths_usable", &pyfuse::cpu::avx512_paths_usable,
        "Whether the AVX-512 paths run (the CPU has AVX-512 F/BW/VL/DQ and they are on).");
  for (auto bind : pyfuse::binders()) bind(m);
}
