// Union-vocabulary ensembling: per-element math shared by the CPU and CUDA kernels, and the argument
// block both receive. The arithmetic is the specification's (pyfuse/reference/ensemble.py) operation for
// operation: exp (a table and a quadratic) and Cephes log from +, * and bit operations (no libm, no FMA:
// -ffp-contract=off / -fmad=false), and fixed-point int64 sums, so every backend produces the same bits.
#pragma once

#include "pyfuse/common.h"
#include "pyfuse/philox.h"

#if !defined(__CUDACC__)
#include <stdexcept>
#include <vector>
#endif

namespace pyfuse {
namespace ensemble {

constexpr int kMaxModels = 8;
constexpr int kMaxTopk = 32;
constexpr float kFixScale = 1099511627776.0f;   // 2^40
constexpr float kFixUnit = 9.094947017729282e-13f;  // 2^-40
constexpr uint32_t kSamplePurpose = 0x454E534Du;  // "ENSM"

struct Args {
  int32_t num_models;
  int32_t dtype;
  int64_t batch;
  int64_t union_size;
  const void* logits[kMaxModels];
  int64_t row_stride[kMaxModels];
  int64_t vocab[kMaxModels];
  const int32_t* to_union[kMaxModels];
  const int32_t* rev_offsets[kMaxModels];
  const int32_t* rev_ids[kMaxModels];
  const int32_t* first_ids[kMaxModels];  // CPU fast path: the model's only id of u, or -1 (none or several)
  const int32_t* multi[kMaxModels];      // CPU fast path: (union id, model id) pairs of union ids with several
  int64_t num_multi[kMaxModels];         // pairs in multi
  int64_t max_mult[kMaxModels];          // longest reverse list
  const int32_t* from_union[kMaxModels];
  // CPU fast path for model 0 (pyfuse/ensemble/maps.py: row_layout), all null when the map has none: the
  // exponential pass writes model 0's values straight into the key row at their union ids.
  const int32_t* row_bits;    // [ceil(V_0 / 16)] per 16 ids: first-id bits | many-to-one member bits << 16
  const int32_t* row_start;   // [ceil(V_0 / 16)] union id of the vector's first first-id lane; -1: none, or
                              // its first-id lanes' union ids are not consecutive
  const int32_t* row_mstart;  // [ceil(V_0 / 16)] many-to-one members before the vector
  const int32_t* row_single;  // [ceil(U / 16)] per 16 union ids: bits where model 0 has exactly one id
  const int32_t* row_slot;    // [num_multi[0]] rank of multi[0]'s model id among the many-to-one members
  // CPU fast path for a later model with few single ids (maps.py: sparse_pairs): (union id, model id) pairs
  // of its single ids, ascending; none (0) for model 0 and for the others.
  const int32_t* sparse[kMaxModels];
  int64_t num_sparse[kMaxModels];
  float inv_temp[kMaxModels];
  const uint8_t* present;  // [U] bit m: model m has the union id
  const float* weights;    // [B, M], rows sum to 1
  const float* cpat;       // [B, 2^M] coefficient per present pattern
  bool logprob;
  bool renormalize;
};

// c ? a : b on bits. GCC will not if-convert a float ternary whose operands may trap
// (-ftrapping-math), which would keep the hot loops scalar.
PYFUSE_HD float select(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

// 2^(j/32), j = 0..31, rounded to float: exp_det's table (pyfuse/reference/ensemble.py: EXP2_THIRTYSECONDS).
#define PYFUSE_EXP2_THIRTYSECONDS \
  {0x1.000000p+0f, 0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f,  \
   0x1.2387a6p+0f, 0x1.29e9e0p+0f, 0x1.306fe0p+0f, 0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f,  \
   0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab07ep+0f, 0x1.6247ecp+0f, 0x1.6a09e6p+0f, 0x1.71f75ep+0f,  \
   0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f,  \
   0x1.ae89fap+0f, 0x1.b7f770p+0f, 0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f,  \
   0x1.ea4afap+0f, 0x1.f50766p+0f}
constexpr float kExp2ThirtySeconds[32] = PYFUSE_EXP2_THIRTYSECONDS;
#if defined(__CUDACC__)
__device__ const float kExp2ThirtySecondsDevice[32] = PYFUSE_EXP2_THIRTYSECONDS;
#endif
constexpr float kRound32nds = 393216.0f;  // 1.5 * 2^18: a float in [2^18, 2^19) has ulp 1/32
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // Cephes' two-part ln2 (exp_det, log_det)
constexpr float kExpC1 = 1.000014305114746f, kExpC2 = 0.49996230006217957f;

PYFUSE_HD float exp2_thirtyseconds(int32_t j) {
#if defined(__CUDA_ARCH__)
  return kExp2ThirtySecondsDevice[j];
#else
  return kExp2ThirtySeconds[j];
#endif
}

// exp(z) for z <= 0, within 1.73 ulp; 0 for z < -87, -inf or NaN; exactly 1 at 0. z = k ln2/32 + r,
// exp(z) = 2^(k >> 5) * t * (1 + q), t = 2^((k & 31) / 32), q = r * (C1 + C2 r) (the reference's docstring
// says why this form).
PYFUSE_HD float exp_det(float z) {
  const bool ok = z >= -87.0f;
  z = select(ok, z, 0.0f);
  const float kk = (z * kLog2e + kRound32nds) - kRound32nds;  // k / 32: the add rounds
  float r = z - kk * kLn2Hi;
  r = r - kk * kLn2Lo;
  const float q = (r * kExpC2 + kExpC1) * r;
  const int32_t k = static_cast<int32_t>(kk * 32.0f);
  const float t = exp2_thirtyseconds(k & 31);
  const float scale = bits_float(static_cast<uint32_t>((k >> 5) + 127) << 23);
  return select(ok, (t * q + t) * scale, 0.0f);
}

// log(x) for x >= 0; -inf below FLT_MIN.
PYFUSE_HD float log_det(float x) {
  const bool ok = x >= 1.17549435e-38f;
  const uint32_t bits = float_bits(select(ok, x, 1.0f));
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = select(small, (m + m) - 1.0f, m - 1.0f);
  const float z = m * m;
  float y = m * 7.0376836292e-2f + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m;
  y = y * z;
  const float fe = static_cast<float>(e);
  y = y + fe * kLn2Lo;
  y = y - z * 0.5f;
  float r = m + y;
  r = r + fe * kLn2Hi;
  return select(ok, r, bits_float(0xFF800000u));
}

PYFUSE_HD int64_t fix(float v) { return static_cast<int64_t>(v * kFixScale); }

// 1 / (fp32(total) * 2^-40), or 0 when total == 0.
PYFUSE_HD float unfix_recip(int64_t total) {
  return total > 0 ? 1.0f / (static_cast<float>(total) * kFixUnit) : 0.0f;
}

// One model's term of a union id's combination (model order). present: the model has the union id.
PYFUSE_HD void combine_step(float& acc, bool& used, float w, float p, bool present, bool logprob, bool renormalize) {
  if (!logprob) {
    acc = acc + w * p;
  } else if (w > 0.0f && (present || !renormalize)) {
    acc = acc + w * log_det(p);
    used = true;
  }
}

PYFUSE_HD float combine_finish(float acc, bool used, float c, bool logprob) {
  if (!logprob) return acc * c;
  return used ? acc * c : bits_float(0xFF800000u);
}

// Order-preserving int64 of (value desc, id asc): larger is better.
PYFUSE_HD int64_t sort_key(float x, int64_t id) {
  int64_t i = static_cast<int32_t>(float_bits(x));
  if (i < 0) i ^= 0x7FFFFFFF;
  return i * 4294967296LL + (4294967295LL - id);
}

// floor(total * s / 2^31) for the row's Philox 31-bit draw s.
PYFUSE_HD int64_t sample_target(int64_t total, uint64_t seed, int64_t row, uint32_t stream) {
  const uint32_t w = philox::randint4x(seed, static_cast<uint64_t>(row), stream, kSamplePurpose).v[0];
  const int64_t s = w >= 0x80000000u ? static_cast<int64_t>(0xFFFFFFFFu - w) : static_cast<int64_t>(w);
  return (total >> 31) * s + (((total & 0x7FFFFFFFLL) * s) >> 31);
}


#if !defined(__CUDACC__)
// The argument block from the per-model pointer lists that pyfuse/ensemble/ops.py passes (both bindings).
using Ptrs = std::vector<uintptr_t>;
template <typename T>
inline void fill_ptrs(T* dst, const std::vector<uintptr_t>& src) {
  for (size_t i = 0; i < src.size(); ++i) dst[i] = reinterpret_cast<T>(src[i]);
}

// The argument block from the per-model pointer lists (pyfuse/ensemble/ops.py builds them).
inline Args make_args(const Ptrs& logits, const std::vector<int64_t>& row_stride, const std::vector<int64_t>& vocab,
               const Ptrs& to_union, const Ptrs& rev_offsets, const Ptrs& rev_ids, const Ptrs& first_ids,
               const Ptrs& multi, const std::vector<int64_t>& num_multi, const std::vector<int64_t>& max_mult,
               const Ptrs& from_union, const Ptrs& row_layout, const Ptrs& sparse,
               const std::vector<int64_t>& num_sparse,
               const std::vector<float>& inv_temp, uintptr_t present, uintptr_t weights, uintptr_t cpat,
               int32_t dtype, int64_t batch, int64_t union_size, bool logprob, bool renormalize) {
  const size_t M = logits.size();
  if (M < 1 || M > static_cast<size_t>(pyfuse::ensemble::kMaxModels)) throw std::invalid_argument("1 to 8 models");
  for (size_t n : {row_stride.size(), vocab.size(), to_union.size(), rev_offsets.size(), rev_ids.size(),
                   first_ids.size(), multi.size(), num_multi.size(), sparse.size(), num_sparse.size(),
                   max_mult.size(), inv_temp.size()}) {
    if (n != M) throw std::invalid_argument("per-model lists must all have one entry per model");
  }
  Args a{};
  a.num_models = static_cast<int32_t>(M);
  a.dtype = dtype;
  a.batch = batch;
  a.union_size = union_size;
  fill_ptrs(a.logits, logits);
  fill_ptrs(a.to_union, to_union);
  fill_ptrs(a.rev_offsets, rev_offsets);
  fill_ptrs(a.rev_ids, rev_ids);
  fill_ptrs(a.first_ids, first_ids);
  fill_ptrs(a.multi, multi);
  fill_ptrs(a.sparse, sparse);
  if (!from_union.empty()) fill_ptrs(a.from_union, from_union);
  if (!row_layout.empty()) {
    if (row_layout.size() != 5) throw std::invalid_argument("row_layout must hold 5 tables or none");
    const int32_t** parts[5] = {&a.row_bits, &a.row_start, &a.row_mstart, &a.row_single, &a.row_slot};
    for (size_t i = 0; i < 5; ++i) *parts[i] = reinterpret_cast<const int32_t*>(row_layout[i]);
  }
  for (size_t m = 0; m < M; ++m) {
    a.row_stride[m] = row_stride[m];
    a.vocab[m] = vocab[m];
    a.num_multi[m] = num_multi[m];
    a.num_sparse[m] = m == 0 ? 0 : num_sparse[m];  // model 0's term is written, never a sparse sum
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
#endif

}  // namespace ensemble

namespace cpu {
void union_probs(const ensemble::Args& a, float* out);
void next_token(const ensemble::Args& a, bool greedy, uint64_t seed, uint32_t stream, int64_t* union_ids,
                int64_t* model_ids, float* prob);
void union_topk(const ensemble::Args& a, int k, float* probs, int64_t* union_ids);
}  // namespace cpu

namespace cuda {
// Launchers (device pointers in Args; stream as an integer handle). See pyfuse/ensemble/ops.py for the flow.
constexpr int kTile = 256;  // union ids per block
void model_stats(const ensemble::Args& a, float* mx, int64_t* total, uintptr_t stream);
void union_pass(const ensemble::Args& a, int mode, const float* mx, const float* inv_s, const float* kmax, float* out,
                float* tile_val, int64_t* tile_idx, uintptr_t stream);
void pick(const ensemble::Args& a, const float* mx, const float* inv_s, const float* kmax, const int64_t* tile,
          const int64_t* base, const int64_t* target, int64_t* chosen, float* score, uintptr_t stream);
void scores(const ensemble::Args& a, float* out, const float* kmax, int64_t* tile_sum, uintptr_t stream);
void scale(const ensemble::Args& a, float* out, const float* inv_z, uintptr_t stream);
void union_topk(const ensemble::Args& a, int k, float* probs, int64_t* union_ids, uintptr_t stream);
}  // namespace cuda

}  // namespace pyfuse
