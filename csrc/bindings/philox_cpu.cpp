#include "cpu/philox.h"
#include "pyfuse/philox.h"
#include "registry.h"

PYFUSE_BINDINGS(philox) {
  m.def(
      "rand_uniform",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream, int32_t isa, bool packed) {
        return pyfuse::cpu::rand_uniform(reinterpret_cast<float*>(out), n, seed, offset, stream,
                                         static_cast<pyfuse::cpu::PhiloxIsa>(isa),
                                         packed ? pyfuse::cpu::kPhiloxPacked : pyfuse::cpu::kPhiloxFirstWord);
      },
      pybind11::arg("out"), pybind11::arg("n"), pybind11::arg("seed"), pybind11::arg("offset"),
      pybind11::arg("stream"), pybind11::arg("isa") = 0, pybind11::arg("packed") = false, PYFUSE_NOGIL,
      "Fill float32 out[n] with the Philox uniforms of elements offset + i of (stream, purpose 0): word 0 of "
      "counter offset + i (tl.rand), or with packed=True word e % 4 of counter e / 4 (e = offset + i). isa: 0 "
      "widest the CPU has, 1 AVX-512, 2 AVX2, 3 scalar; returns False (out untouched) when the CPU lacks that "
      "path.");
  m.def(
      "philox4x32",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int rounds) {
        auto r = pyfuse::philox::philox4x32(c0, c1, c2, c3, k0, k1, rounds);
        return pybind11::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
      },
      "Raw Philox4x32 block (for the known-answer tests).");
}
