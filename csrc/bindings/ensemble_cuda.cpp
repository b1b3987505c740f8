#include <pybind11/stl.h>

#include "pyfuse/ensemble.h"
#include "registry.h"

PYFUSE_BINDINGS(ensemble) {
  namespace py = pybind11;
  using pyfuse::ensemble::Args;
  namespace cu = pyfuse::cuda;
  // module_local: _C registers the same C++ type; both modules are loaded in one process.
  py::class_<Args>(m, "EnsembleArgs", py::module_local(),
                   "Argument block of the union-vocabulary ops (device pointers).");
  m.def("ensemble_args", &pyfuse::ensemble::make_args, "Build the argument block from per-model pointer lists.");
  m.attr("ensemble_tile") = cu::kTile;
  m.def(
      "model_stats",
      [](const Args& a, uintptr_t mx, uintptr_t total, uintptr_t stream) {
        cu::model_stats(a, reinterpret_cast<float*>(mx), reinterpret_cast<int64_t*>(total), stream);
      },
      PYFUSE_NOGIL, "Per (row, model): max tempered logit and fixed-point sum of exponentials.");
  m.def(
      "union_pass",
      [](const Args& a, int mode, uintptr_t mx, uintptr_t inv_s, uintptr_t kmax, uintptr_t out, uintptr_t tile_val,
         uintptr_t tile_idx, uintptr_t stream) {
        cu::union_pass(a, mode, reinterpret_cast<const float*>(mx), reinterpret_cast<const float*>(inv_s),
                       reinterpret_cast<const float*>(kmax), reinterpret_cast<float*>(out),
                       reinterpret_cast<float*>(tile_val), reinterpret_cast<int64_t*>(tile_idx), stream);
      },
      PYFUSE_NOGIL, "Union keys per (row, tile): stored (mode 0), tile max (1) or tile score sum (2).");
  m.def(
      "pick",
      [](const Args& a, uintptr_t mx, uintptr_t inv_s, uintptr_t kmax, uintptr_t tile, uintptr_t base,
         uintptr_t target, uintptr_t chosen, uintptr_t score, uintptr_t stream) {
        cu::pick(a, reinterpret_cast<const float*>(mx), reinterpret_cast<const float*>(inv_s),
                 reinterpret_cast<const float*>(kmax), reinterpret_cast<const int64_t*>(tile),
                 reinterpret_cast<const int64_t*>(base), reinterpret_cast<const int64_t*>(target),
                 reinterpret_cast<int64_t*>(chosen), reinterpret_cast<float*>(score), stream);
      },
      PYFUSE_NOGIL, "Sampled union id per row inside its chosen tile.");
  m.def(
      "scores",
      [](const Args& a, uintptr_t out, uintptr_t kmax, uintptr_t tile_sum, uintptr_t stream) {
        cu::scores(a, reinterpret_cast<float*>(out), reinterpret_cast<const float*>(kmax),
                   reinterpret_cast<int64_t*>(tile_sum), stream);
      },
      PYFUSE_NOGIL, "Keys -> scores in place, with per-tile fixed-point sums.");
  m.def(
      "scale",
      [](const Args& a, uintptr_t out, uintptr_t inv_z, uintptr_t stream) {
        cu::scale(a, reinterpret_cast<float*>(out), reinterpret_cast<const float*>(inv_z), stream);
      },
      PYFUSE_NOGIL, "out[b, :] *= inv_z[b].");
  m.def(
      "union_topk",
      [](const Args& a, int k, uintptr_t probs, uintptr_t union_ids, uintptr_t stream) {
        cu::union_topk(a, k, reinterpret_cast<float*>(probs), reinterpret_cast<int64_t*>(union_ids), stream);
      },
      PYFUSE_NOGIL, "UniTE top-k over the union of the models' top-k candidates.");
}
