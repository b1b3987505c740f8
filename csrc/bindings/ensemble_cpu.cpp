#include <pybind11/stl.h>

#include "pyfuse/ensemble.h"
#include "registry.h"

PYFUSE_BINDINGS(ensemble) {
  namespace py = pybind11;
  using pyfuse::ensemble::Args;
  py::class_<Args>(m, "EnsembleArgs", "Argument block of the union-vocabulary ops (see ops.py).");
  m.def("ensemble_args", &pyfuse::ensemble::make_args, "Build the argument block from per-model pointer lists.");
  m.def(
      "union_probs",
      [](const Args& a, uintptr_t out) { pyfuse::cpu::union_probs(a, reinterpret_cast<float*>(out)); },
      PYFUSE_NOGIL, "float32 out[B, U] = ensemble probabilities over the union.");
  m.def(
      "next_token",
      [](const Args& a, bool greedy, uint64_t seed, uint32_t stream, uintptr_t union_ids, uintptr_t model_ids,
         uintptr_t prob) {
        pyfuse::cpu::next_token(a, greedy, seed, stream, reinterpret_cast<int64_t*>(union_ids),
                                reinterpret_cast<int64_t*>(model_ids), reinterpret_cast<float*>(prob));
      },
      PYFUSE_NOGIL, "Greedy or sampled next union token per row, with per-model ids and probability.");
  m.def(
      "union_topk",
      [](const Args& a, int k, uintptr_t probs, uintptr_t union_ids) {
        pyfuse::cpu::union_topk(a, k, reinterpret_cast<float*>(probs), reinterpret_cast<int64_t*>(union_ids));
      },
      PYFUSE_NOGIL, "UniTE top-k over the union of the models' top-k candidates.");
}
