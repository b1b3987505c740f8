#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "pyfuse/ensemble.h"
#include "registry.h"

namespace {

using pyfuse::ensemble::Args;
using Ptrs = std::vector<uintptr_t>;

template <typename T>
void fill(T* dst, const std::vector<uintptr_t>& src) {
  for (size_t i = 0; i < src.size(); ++i) dst[i] = reinterpret_cast<T>(src[i]);
}

// The argument block from the per-model pointer lists (pyfuse/ensemble/ops.py builds them).
Args make_args(const Ptrs& logits, const std::vector<int64_t>& row_stride, const std::vector<int64_t>& vocab,
               const Ptrs& to_union, const Ptrs& rev_offsets, const Ptrs& rev_ids, const Ptrs& first_ids,
               const Ptrs& multi, const std::vector<int64_t>& num_multi, const std::vector<int64_t>& max_mult,
               const Ptrs& from_union,
               const std::vector<float>& inv_temp, uintptr_t present, uintptr_t weights, uintptr_t cpat,
               int32_t dtype, int64_t batch, int64_t union_size, bool logprob, bool renormalize) {
  const size_t M = logits.size();
  if (M < 1 || M > static_cast<size_t>(pyfuse::ensemble::kMaxModels)) throw std::invalid_argument("1 to 8 models");
  for (size_t n : {row_stride.size(), vocab.size(), to_union.size(), rev_offsets.size(), rev_ids.size(),
                   first_ids.size(), multi.size(), num_multi.size(), max_mult.size(), inv_temp.size()}) {
    if (n != M) throw std::invalid_argument("per-model lists must all have one entry per model");
  }
  Args a{};
  a.num_models = static_cast<int32_t>(M);
  a.dtype = dtype;
  a.batch = batch;
  a.union_size = union_size;
  fill(a.logits, logits);
  fill(a.to_union, to_union);
  fill(a.rev_offsets, rev_offsets);
  fill(a.rev_ids, rev_ids);
  fill(a.first_ids, first_ids);
  fill(a.multi, multi);
  if (!from_union.empty()) fill(a.from_union, from_union);
  for (size_t m = 0; m < M; ++m) {
    a.row_stride[m] = row_stride[m];
    a.vocab[m] = vocab[m];
    a.num_multi[m] = num_multi[m];
    a.max_mult[m] = max_mult[m];
    a.inv_temp[m] = inv_temp[m];
  }
  a.present = reinterpret_cast<const uint8_t*>(present);
  a.weights = reinterpret_cast<const float*>(weights);
  a.cpat = reinterpret_cast<const float*>(cpat);
  a.logprob = logprob;
  a.renormalize = renormalize;
  return a;
}

}  // namespace

PYFUSE_BINDINGS(ensemble) {
  namespace py = pybind11;
  py::class_<Args>(m, "EnsembleArgs", "Argument block of the union-vocabulary ops (see ops.py).");
  m.def("ensemble_args", &make_args, "Build the argument block from per-model pointer lists.");
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
