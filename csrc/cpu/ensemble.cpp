// Union-vocabulary ensembling on the CPU. Work is split on a fixed grid, independent of the thread count:
// model statistics over (row, model, chunk of model ids), keys over (row, tile of union ids); see run() for
// how rows map to threads. Partial results are maxima and fixed-point int64 sums, which are exact and
// order-free, so every split gives the reference's bits. The statistics pass stores each row's
// exponentials (float32, whatever the logits dtype); keys gather them through the reverse index (first id
// with AVX-512 gathers, the rare many-to-one ids added after, in id order). Model 0's, whose ids a VocabMap
// numbers in order, go straight into the key row at their union ids where the map has a row layout
// (Work::row0), and its term is then read in place.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <vector>

#include "cpu/avx512_paths.h"
#include "cpu/scratch.h"
#include "pyfuse/ensemble.h"

namespace pyfuse {
namespace cpu {
namespace {

using ensemble::Args;
using ensemble::exp_det;
using ensemble::fix;
using ensemble::unfix_recip;

constexpr int64_t kChunk = 32768;  // model ids per statistics item (a quarter in split mode: Grid)
constexpr int64_t kTile = 2048;    // union ids per key item
constexpr int kLanes = 16;         // lane arrays GCC turns into one AVX-512 (two AVX2) register(s)
const float kNegInf = bits_float(0xFF800000u);

#define PYFUSE_HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define PYFUSE_INLINE inline __attribute__((always_inline))

inline const void* row_ptr(const Args& a, int m, int64_t b) {
  return static_cast<const char*>(a.logits[m]) + b * a.row_stride[m] * dtype_size(a.dtype);
}

// Max of the valid x in [v0, v1) and its lowest id (-1 when no valid x is > -inf). A float max reduction
// only vectorises with -ffast-math, hence the lanes; a positive inv_t keeps the order, so max y = max x * inv_t.
template <int DT>
PYFUSE_INLINE void chunk_max_t(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float* mx_out,
                               int64_t* at_out) {
  float lane[kLanes];
  int32_t lane_at[kLanes];  // V <= 2^22
  for (int j = 0; j < kLanes; ++j) {
    lane[j] = kNegInf;
    lane_at[j] = -1;
  }
  int64_t v = v0;
  for (; v + kLanes <= v1; v += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float y = ensemble::select(fwd[v + j] >= 0, load_float(x, DT, v + j), kNegInf);
      const bool more = y > lane[j];  // strict: each lane keeps its first maximum
      lane[j] = more ? y : lane[j];
      lane_at[j] = more ? static_cast<int32_t>(v + j) : lane_at[j];
    }
  }
  float mx = kNegInf;
  int64_t at = -1;
  for (; v < v1; ++v) {
    const float y = ensemble::select(fwd[v] >= 0, load_float(x, DT, v), kNegInf);
    at = y > mx ? v : at;
    mx = y > mx ? y : mx;
  }
  for (int j = 0; j < kLanes; ++j) {
    const bool better = lane[j] > mx || (lane[j] == mx && lane_at[j] >= 0 && (at < 0 || lane_at[j] < at));
    at = better ? lane_at[j] : at;
    mx = better ? lane[j] : mx;
  }
  *mx_out = mx;
  *at_out = at;
}

// fix(e) for e in [0, 1], in 32-bit steps that AVX2 (and SSE2) vectorize: the int64 conversion in fix() has no
// packed form below AVX-512, so a loop using it stays scalar (4-6x slower at -mavx2). f = e * 2^40 plus 1.5 * 2^43
// rounds f to a multiple H of 2^20, whose bits are that constant's plus H / 2^20; L = f - H is exact, |L| <=
// 2^19, and floor(f) = H + floor(L): the same integer (expsum_loop does the same with AVX-512 intrinsics).
constexpr float kSplit = 13194139533312.0f;  // 1.5 * 2^43: a float there has ulp 2^20
constexpr uint32_t kSplitBits = 0x55400000u;  // its bits
PYFUSE_INLINE int64_t fix_unit(float e) {
  const float f = e * ensemble::kFixScale;
  const float split = f + kSplit;
  const float low = f - (split - kSplit);
  const int32_t high = static_cast<int32_t>(float_bits(split) - kSplitBits);
  const int32_t trunc = static_cast<int32_t>(low);
  const int32_t floor_low = static_cast<float>(trunc) > low ? trunc - 1 : trunc;
  return (static_cast<int64_t>(high) << 20) + floor_low;
}

// Fixed-point sum of e_v = exp_det(y_v - mx) over the valid ids in [v0, v1) (0 at the others), and e_v
// into e[v] unless e is null. One loop per case: a branch on e inside kept GCC from vectorizing it.
template <int DT, bool kStore>
PYFUSE_INLINE int64_t expsum_t(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float inv_t, float mx,
                               float* e) {
  int64_t s = 0;
  for (int64_t v = v0; v < v1; ++v) {
    const float ev = ensemble::select(fwd[v] >= 0, exp_det(load_float(x, DT, v) * inv_t - mx), 0.0f);
    if constexpr (kStore) e[v] = ev;
    s += fix_unit(ev);
  }
  return s;
}
template <int DT>
PYFUSE_INLINE int64_t chunk_expsum_t(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float inv_t,
                                     float mx, float* e) {
  return e ? expsum_t<DT, true>(x, fwd, v0, v1, inv_t, mx, e) : expsum_t<DT, false>(x, fwd, v0, v1, inv_t, mx, e);
}

#define PYFUSE_PER_DTYPE(name, impl, DT, params, args) \
  PYFUSE_HOT auto name params { return impl<DT> args; }
#define PYFUSE_MAX_PARAMS (const void* x, const int32_t* f, int64_t v0, int64_t v1, float* mx, int64_t* at)
#define PYFUSE_SUM_PARAMS (const void* x, const int32_t* f, int64_t v0, int64_t v1, float t, float mx, float* e)
PYFUSE_PER_DTYPE(chunk_max_f32, chunk_max_t, kFloat32, PYFUSE_MAX_PARAMS, (x, f, v0, v1, mx, at))
PYFUSE_PER_DTYPE(chunk_max_f16, chunk_max_t, kFloat16, PYFUSE_MAX_PARAMS, (x, f, v0, v1, mx, at))
PYFUSE_PER_DTYPE(chunk_max_bf16, chunk_max_t, kBFloat16, PYFUSE_MAX_PARAMS, (x, f, v0, v1, mx, at))
PYFUSE_PER_DTYPE(chunk_expsum_f32, chunk_expsum_t, kFloat32, PYFUSE_SUM_PARAMS, (x, f, v0, v1, t, mx, e))
PYFUSE_PER_DTYPE(chunk_expsum_f16, chunk_expsum_t, kFloat16, PYFUSE_SUM_PARAMS, (x, f, v0, v1, t, mx, e))
PYFUSE_PER_DTYPE(chunk_expsum_bf16, chunk_expsum_t, kBFloat16, PYFUSE_SUM_PARAMS, (x, f, v0, v1, t, mx, e))

// Where the exponential pass records the valid ids with z = y_v - mx >= z_min (ids, in id order; null: none).
// greedy_prob_zero's candidates are a subset of them, so it filters this short list instead of the row.
struct NearIds {
  float z_min = 0.0f;
  std::vector<int32_t>* ids = nullptr;
};

// Model 0's exponentials straight into the key row (Args::row_*, the map's row layout): each first id's value
// at its union id, each many-to-one member's into side (compact, in id order). The key pass then reads model
// 0's term in place instead of gathering it.
struct RowOut {
  float* row;
  float* side;
  const int32_t* bits;
  const int32_t* start;
  const int32_t* mstart;
};

// What the exponential pass keeps of e_v: nothing (the sum only), e[v], or the RowOut layout.
enum ExpKeep { kKeepNone, kKeepPlain, kKeepRow };

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// The mask of lanes [0, count), count <= 16.
PYFUSE_INLINE __mmask16 low_lanes(int count) { return static_cast<__mmask16>((1u << count) - 1u); }

// kKeepRow: 16 e_v of ids v.. (v a multiple of 16) into the RowOut; sp is the next member slot. The first-id
// lanes of a vector almost always have consecutive union ids (start >= 0): one compress and a masked store
// of just those lanes (writing nothing past them, as a neighbouring chunk may be another thread's).
PYFUSE_INLINE void keep_row(const RowOut& ro, const int32_t* fwd, int64_t v, __m512 f, int64_t& sp) {
  const uint32_t bits = static_cast<uint32_t>(ro.bits[v >> 4]);
  const __mmask16 first = static_cast<__mmask16>(bits), member = static_cast<__mmask16>(bits >> 16);
  if (first != 0) {
    const int32_t u = ro.start[v >> 4];
    if (u >= 0) {
      _mm512_mask_storeu_ps(ro.row + u, low_lanes(__builtin_popcount(first)), _mm512_maskz_compress_ps(first, f));
    } else {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, f);
      for (uint32_t l = first; l != 0; l &= l - 1) ro.row[fwd[v + __builtin_ctz(l)]] = lanes[__builtin_ctz(l)];
    }
  }
  if (member != 0) {  // not vcompressps to memory: microcoded on AMD Zen 4 (it took a third of this loop there)
    const int count = __builtin_popcount(member);
    _mm512_mask_storeu_ps(ro.side + sp, low_lanes(count), _mm512_maskz_compress_ps(member, f));
    sp += count;
  }
}

// chunk_expsum_t with AVX-512 intrinsics, the same values: exp_det's table lookup is one vpermt2ps whose
// index is the rounding add itself (its low five mantissa bits are k & 31; vpermt2ps ignores the others), and
// its scale by 2^(k >> 5) one vscalefps by 2^floor(kk) (the correctly rounded product, as the exponent-bit
// multiply is). The tail goes through exp_det itself. Also records the NearIds, if asked.
// ahead (null: none): the same chunk in the row this thread takes next, fetched into L2 meanwhile (one line per
// vector), so that row's max pass, otherwise bound by memory, reads from cache while this compute-bound loop
// hides the transfer.
// kDense: every id of [v0, v1) is mapped (Work::dense), so the map is not read.
// The loop is bound by the vector floating-point port, so two operations are saved where the bits allow:
// kUnitT (inv_t == 1): y = x, as x * 1 is x. kKeepNone (nothing kept): the fixed-point operand e * 2^40 comes
// from a table scaled by 2^40.
// [v0, v1) spans at most kChunk ids (a Grid chunk: hits has room for every vector). The loop calls no function:
// every zmm register is caller-saved, so a call in it (the NearIds push_back) made GCC keep the constants on the
// stack; hits are buffered and pushed after.
template <int DT, bool kDense, bool kUnitT, int kKeep>
int64_t expsum_loop(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float inv_t, float mx, float* e,
                    const RowOut& ro, NearIds near, const char* ahead) {
  constexpr bool kStore = kKeep != kKeepNone;
  int64_t sp = kKeep == kKeepRow ? ro.mstart[v0 >> 4] : 0;  // v0: a chunk start, a multiple of 16
  struct Hits {
    int32_t v;  // ids < 2^22
    uint32_t lanes;
  };
  Hits hits[kChunk / 16];
  int64_t num_hits = 0;
  const __m512 near_v = _mm512_set1_ps(near.z_min);
  // Without e only the fixed-point sum is wanted, and exp_det(z) < 2^-40 (a term of 0) for z < -28, so such
  // lanes count as 0 and a vector of them skips the arithmetic: the same sum, and real (peaked) logits have
  // most of a vocabulary there. With e, exp_det's own cut-off -87.
  const __m512 t_v = _mm512_set1_ps(inv_t), mx_v = _mm512_set1_ps(mx), lo = _mm512_set1_ps(kStore ? -87.0f : -28.0f);
  const __m512 log2e = _mm512_set1_ps(ensemble::kLog2e), round_v = _mm512_set1_ps(ensemble::kRound32nds);
  const __m512 c1 = _mm512_set1_ps(ensemble::kLn2Hi), c2 = _mm512_set1_ps(ensemble::kLn2Lo);
  const __m512 q1 = _mm512_set1_ps(ensemble::kExpC1), q2 = _mm512_set1_ps(ensemble::kExpC2);
  const __m512 fix_scale = _mm512_set1_ps(ensemble::kFixScale);
  // Without e, a table scaled by 2^40: (t * 2^40) * q + t * 2^40 = 2^40 * (t * q + t) exactly, so the loop
  // yields the fixed-point operand e * 2^40 with no extra operation (both exact where e is normal; where it is
  // not, both truncate to 0).
  const __m512 table_scale = kStore ? _mm512_set1_ps(1.0f) : fix_scale;
  const __m512 table_lo = _mm512_mul_ps(_mm512_loadu_ps(ensemble::kExp2ThirtySeconds), table_scale);
  const __m512 table_hi = _mm512_mul_ps(_mm512_loadu_ps(ensemble::kExp2ThirtySeconds + 16), table_scale);
  const __m512 split_v = _mm512_set1_ps(kSplit);
  __m512i hi_bits = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
  uint32_t summed = 0;  // vectors added to hi_bits
  int64_t v = v0;
  for (; v + 16 <= v1; v += 16) {
    if (ahead != nullptr) _mm_prefetch(ahead + v * dtype_size(DT), _MM_HINT_T1);
    const __m512 y = kUnitT ? load16<DT>(x, v) : _mm512_mul_ps(load16<DT>(x, v), t_v);
    const __m512 z = _mm512_sub_ps(y, mx_v);
    const __mmask16 valid =
        kDense ? __mmask16{0xFFFF} : _mm512_cmpge_epi32_mask(_mm512_loadu_si512(fwd + v), _mm512_setzero_si512());
    const __mmask16 ok = _mm512_cmp_ps_mask(z, lo, _CMP_GE_OQ) & valid;
    if (near.ids != nullptr) {  // rare hits: a few ids per row
      const uint32_t lanes = _mm512_cmp_ps_mask(z, near_v, _CMP_GE_OQ) & valid;
      if (lanes != 0) hits[num_hits++] = {static_cast<int32_t>(v), lanes};
    }
    if (!kStore && ok == 0) continue;
    // exp_det's select(ok, z, 0) is left out: the lanes it would change are zeroed at the end.
    const __m512 rounded = _mm512_add_ps(_mm512_mul_ps(z, log2e), round_v);
    const __m512 kk = _mm512_sub_ps(rounded, round_v);  // k / 32
    __m512 r = _mm512_sub_ps(z, _mm512_mul_ps(kk, c1));
    r = _mm512_sub_ps(r, _mm512_mul_ps(kk, c2));
    const __m512 q = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(r, q2), q1), r);
    const __m512 t = _mm512_permutex2var_ps(table_lo, _mm512_castps_si512(rounded), table_hi);
    // vscalefps scales by 2^floor(kk) = 2^(k >> 5).
    __m512 f = _mm512_maskz_scalef_ps(ok, _mm512_add_ps(_mm512_mul_ps(t, q), t), kk);
    if constexpr (kKeep == kKeepPlain) _mm512_storeu_ps(e + v, f);
    if constexpr (kKeep == kKeepRow) keep_row(ro, fwd, v, f, sp);
    if constexpr (kStore) f = _mm512_mul_ps(f, fix_scale);
    // fix_unit's split of f = e * 2^40 (two vcvttps2qq and an extract, the int64 conversion, cost a third of
    // this loop): H / 2^20 <= 2^20 from the bits of f + kSplit, and floor(L) of the exact remainder.
    const __m512 split = _mm512_add_ps(f, split_v);
    const __m512 low = _mm512_sub_ps(f, _mm512_sub_ps(split, split_v));
    hi_bits = _mm512_add_epi32(hi_bits, _mm512_castps_si512(split));
    lo_sum = _mm512_add_epi32(lo_sum, _mm512_cvt_roundps_epi32(low, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    ++summed;
  }
  // At most kChunk / 16 = 2048 vectors: per lane, the H / 2^20 sum <= 2^31 (fits uint32 once the kSplit bits
  // added per vector are taken off, modulo 2^32) and |L| sum <= 2^30.
  static_assert(kChunk / 16 <= 2048, "fixed-point lane sums of expsum_loop could overflow");
  const __m512i hi = _mm512_sub_epi32(hi_bits, _mm512_set1_epi32(static_cast<int32_t>(summed * kSplitBits)));
  int64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi)),
                                                       _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1))))
              << 20;
  s += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(lo_sum)),
                                                _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lo_sum, 1))));
  for (int64_t h = 0; h < num_hits; ++h) {
    for (uint32_t lanes = hits[h].lanes; lanes != 0; lanes &= lanes - 1) {
      near.ids->push_back(static_cast<int32_t>(hits[h].v + __builtin_ctz(lanes)));
    }
  }
  for (; v < v1; ++v) {
    const float z = load_float(x, DT, v) * inv_t - mx;
    const float ev = ensemble::select(fwd[v] >= 0, exp_det(z), 0.0f);
    if (near.ids != nullptr && fwd[v] >= 0 && z >= near.z_min) near.ids->push_back(static_cast<int32_t>(v));
    if (kKeep == kKeepPlain) e[v] = ev;
    if (kKeep == kKeepRow) {
      const uint32_t bits = static_cast<uint32_t>(ro.bits[v >> 4]);
      if ((bits >> (v & 15)) & 1u) ro.row[fwd[v]] = ev;
      if ((bits >> (16 + (v & 15))) & 1u) ro.side[sp++] = ev;
    }
    s += fix(ev);
  }
  return s;
}

template <int DT, bool kDense, bool kUnitT>
int64_t expsum_keep(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float inv_t, float mx, float* e,
                    const RowOut* ro, NearIds near, const char* ahead) {
  static const RowOut kNoRow{};
  if (ro != nullptr) return expsum_loop<DT, kDense, kUnitT, kKeepRow>(x, fwd, v0, v1, inv_t, mx, e, *ro, near, ahead);
  return e ? expsum_loop<DT, kDense, kUnitT, kKeepPlain>(x, fwd, v0, v1, inv_t, mx, e, kNoRow, near, ahead)
           : expsum_loop<DT, kDense, kUnitT, kKeepNone>(x, fwd, v0, v1, inv_t, mx, e, kNoRow, near, ahead);
}

template <int DT, bool kDense>
int64_t chunk_expsum_avx512(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float inv_t, float mx,
                            float* e, const RowOut* ro, NearIds near, const char* ahead) {
  return inv_t == 1.0f ? expsum_keep<DT, kDense, true>(x, fwd, v0, v1, inv_t, mx, e, ro, near, ahead)
                       : expsum_keep<DT, kDense, false>(x, fwd, v0, v1, inv_t, mx, e, ro, near, ahead);
}

// chunk_max_t with AVX-512 intrinsics, the same results: plain maxima over blocks of 256 ids (four independent
// accumulators: the loop is bound by memory, not by a chain of compares and blends), a block's maximum reduced
// only when it beats the chunk's so far (strict: the first such block holds the lowest id of the maximum),
// which that block's rescan finds. max_ps(x, acc) returns acc when x is NaN, as the strict compare ignores NaN.
template <int DT, bool kDense>
void chunk_max_avx512(const void* x, const int32_t* fwd, int64_t v0, int64_t v1, float* mx_out, int64_t* at_out) {
  constexpr int64_t kBlock = 256;
  const __m512 none = _mm512_set1_ps(kNegInf);
  const __m512i zero = _mm512_setzero_si512();
  float mx = kNegInf;
  int64_t block = -1, v = v0;
  for (; v + kBlock <= v1; v += kBlock) {
    __m512 acc[4] = {none, none, none, none};
    for (int64_t j = v; j < v + kBlock; j += 64) {
      for (int k = 0; k < 4; ++k) {
        const __mmask16 valid =
            kDense ? __mmask16{0xFFFF} : _mm512_cmpge_epi32_mask(_mm512_loadu_si512(fwd + j + 16 * k), zero);
        acc[k] = _mm512_mask_max_ps(acc[k], valid, load16<DT>(x, j + 16 * k), acc[k]);
      }
    }
    const __m512 m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
    if (_mm512_cmp_ps_mask(m, _mm512_set1_ps(mx), _CMP_GT_OQ) != 0) {
      mx = _mm512_reduce_max_ps(m);
      block = v;
    }
  }
  int64_t at = -1;
  for (int64_t i = block; at < 0 && i >= 0; ++i) {  // ends inside the block: its maximum is one of its valid x
    if (fwd[i] >= 0 && load_float(x, DT, i) == mx) at = i;
  }
  for (; v < v1; ++v) {
    const float y = ensemble::select(fwd[v] >= 0, load_float(x, DT, v), kNegInf);
    at = y > mx ? v : at;
    mx = y > mx ? y : mx;
  }
  *mx_out = mx;
  *at_out = at;
}

#pragma GCC pop_options

// The AVX-512 instance of kernel K for dtype dt and density.
#define PYFUSE_AVX512_INSTANCE(K, dt, dense)                                                       \
  (dense ? (dt == kFloat32 ? K<kFloat32, true> : dt == kFloat16 ? K<kFloat16, true> : K<kBFloat16, true>) \
         : (dt == kFloat32 ? K<kFloat32, false> : dt == kFloat16 ? K<kFloat16, false> : K<kBFloat16, false>))

// dense: every id of [v0, v1) is mapped.
void chunk_max(int32_t dt, const void* x, const int32_t* f, int64_t v0, int64_t v1, bool dense, float* mx,
               int64_t* at) {
  if (avx512_paths_usable()) return PYFUSE_AVX512_INSTANCE(chunk_max_avx512, dt, dense)(x, f, v0, v1, mx, at);
  (dt == kFloat32 ? chunk_max_f32 : dt == kFloat16 ? chunk_max_f16 : chunk_max_bf16)(x, f, v0, v1, mx, at);
}

// near.ids is only filled, and ro (non-null: e_v into the RowOut instead of e) only given, on the AVX-512 path
// (callers check avx512_paths_usable()).
int64_t chunk_expsum(int32_t dt, const void* x, const int32_t* f, int64_t v0, int64_t v1, bool dense, float t,
                     float mx, float* e, const RowOut* ro, NearIds near, const char* ahead) {
  if (avx512_paths_usable()) {
    return PYFUSE_AVX512_INSTANCE(chunk_expsum_avx512, dt, dense)(x, f, v0, v1, t, mx, e, ro, near, ahead);
  }
  return (dt == kFloat32 ? chunk_expsum_f32 : dt == kFloat16 ? chunk_expsum_f16 : chunk_expsum_bf16)(x, f, v0, v1,
                                                                                                     t, mx, e);
}

// g[i] = x[first[i]] (0 where first[i] < 0). GCC's generic tuning never emits gathers, hence the intrinsics;
// masked lanes load nothing.
__attribute__((target("avx512f"))) void gather_avx512(const float* x, const int32_t* first, int64_t n, float* g) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_loadu_si512(first + i);
    const __mmask16 has = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
    _mm512_storeu_ps(g + i, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), has, idx, x, 4));
  }
  for (; i < n; ++i) g[i] = first[i] >= 0 ? x[first[i]] : 0.0f;
}

void gather(const float* x, const int32_t* first, int64_t n, float* g) {
  if (avx512_paths_usable()) return gather_avx512(x, first, n, g);
  for (int64_t i = 0; i < n; ++i) g[i] = first[i] >= 0 ? x[first[i]] : 0.0f;
}

// acc[i] = acc[i] + w * (E[i] * inv_s).
PYFUSE_HOT void add_prob(float* acc, const float* E, int64_t n, float w, float inv_s) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + w * (E[i] * inv_s);
}

PYFUSE_HOT void add_logprob(float* acc, uint8_t* used, const float* E, const uint8_t* present, int64_t n, float w,
                            float inv_s, int m, bool renormalize) {
  for (int64_t i = 0; i < n; ++i) {
    const bool take = !renormalize || ((present[i] >> m) & 1);
    acc[i] = ensemble::select(take, acc[i] + w * ensemble::log_det(E[i] * inv_s), acc[i]);
    used[i] = used[i] | static_cast<uint8_t>(take);
  }
}

PYFUSE_HOT void finish_unit(const float* acc, const uint8_t* used, int64_t n, bool logprob, float* key) {
  for (int64_t i = 0; i < n; ++i) key[i] = logprob ? ensemble::select(used[i] != 0, acc[i], kNegInf) : acc[i];
}

// Per (row, model) statistics: max y, 1 / S and the lowest id of the max, at [b * M + m].
struct RowStats {
  float mx[ensemble::kMaxModels], inv_s[ensemble::kMaxModels];
  int64_t top[ensemble::kMaxModels];
};

// key(u) of one union id from the logits, operation for operation as tile_keys.
float key_of(const Args& a, int64_t b, const RowStats& st, int64_t u) {
  const int M = a.num_models;
  const uint8_t pat = a.present[u] & static_cast<uint8_t>((1u << M) - 1u);
  float acc = 0.0f;
  bool used = false;
  for (int m = 0; m < M; ++m) {
    const void* x = row_ptr(a, m, b);
    float E = 0.0f;
    for (int64_t j = a.rev_offsets[m][u]; j < a.rev_offsets[m][u + 1]; ++j) {
      E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - st.mx[m]);
    }
    ensemble::combine_step(acc, used, a.weights[b * M + m], E * st.inv_s[m], (pat >> m) & 1, a.logprob,
                           a.renormalize);
  }
  return ensemble::combine_finish(acc, used, a.renormalize ? a.cpat[(b << M) + pat] : 1.0f, a.logprob);
}

// One model id v of a union id u that has several (pyfuse/ensemble/maps.py: EnsembleTables.multi).
struct Extra {
  int32_t u, v;
};

// The pairs of all[0, count) (ascending by union id) with union ids in [u0, u0 + n): [*begin, *end).
void pairs_in(const int32_t* pairs, int64_t count, int64_t u0, int64_t n, const Extra** begin, const Extra** end) {
  const Extra* all = reinterpret_cast<const Extra*>(pairs);
  *begin = std::lower_bound(all, all + count, u0, [](const Extra& q, int64_t u) { return q.u < u; });
  *end = std::lower_bound(*begin, all + count, u0 + n, [](const Extra& q, int64_t u) { return q.u < u; });
}

// Model m's pairs of the many-to-one union ids in [u0, u0 + n), ascending: [*begin, *end).
void multi_in(const Args& a, int m, int64_t u0, int64_t n, const Extra** begin, const Extra** end) {
  pairs_in(a.multi[m], a.num_multi[m], u0, n, begin, end);
}

// Model m's exponentials of union ids [u0, u0 + n) (the sum over its ids) into E[n], from its row e.
void tile_exps(const Args& a, int m, const float* e, int64_t u0, int64_t n, float* E) {
  gather(e, a.first_ids[m] + u0, n, E);  // 0 at the many-to-one union ids (first_ids -1), so that
  // their sums below, over all their ids as (union id, model id) pairs in ascending order, start at 0 + e.
  const Extra *p, *end;
  for (multi_in(a, m, u0, n, &p, &end); p < end; ++p) E[p->u - u0] = E[p->u - u0] + e[p->v];
}

// key[i] = (first ? 0 + : key[i] +) w * (e[first_id[i]] * inv_s), 0 for first_id[i] < 0, over whole vectors;
// returns the count done. A 16-id group the model wholly lacks skips the gather (a masked-off gather still
// costs half a full one here: 0.52 vs 1.05 ns per lane).
__attribute__((target("avx512f"))) int64_t gather_add_prob_avx512(const float* e, const int32_t* first_id,
                                                                  int64_t n, float w, float inv_s, bool first,
                                                                  float* key) {
  const __m512 w_v = _mm512_set1_ps(w), inv_v = _mm512_set1_ps(inv_s);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_loadu_si512(first_id + i);
    const __mmask16 has = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
    if (has == 0) {  // a term of 0: key + 0 is key
      if (first) _mm512_storeu_ps(key + i, _mm512_setzero_ps());
      continue;
    }
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), has, idx, e, 4);
    const __m512 t = _mm512_mul_ps(w_v, _mm512_mul_ps(g, inv_v));
    _mm512_storeu_ps(key + i, first ? t : _mm512_add_ps(_mm512_loadu_ps(key + i), t));
  }
  return i;
}

// Model m's terms w * (E * inv_s) of the many-to-one union ids in [u0, u0 + n) into key (written when first,
// else added), E = 0 + the values of their ids in ascending order; value(j) is that of pair j of multi[m]
// (ascending by union id, then model id).
template <typename Value>
void multi_terms(const Args& a, int m, int64_t u0, int64_t n, float w, float inv_s, bool first, Value value,
                 float* key) {
  const Extra *p, *end;
  multi_in(a, m, u0, n, &p, &end);
  const Extra* all = reinterpret_cast<const Extra*>(a.multi[m]);
  while (p < end) {
    const int32_t u = p->u;
    float E = 0.0f;
    for (; p < end && p->u == u; ++p) E = E + value(p - all);
    const float t = w * (E * inv_s);
    key[u - u0] = first ? t : key[u - u0] + t;
  }
}

// Mode "prob" + absent "zero": the key is the weighted sum itself; model m's term of it for union ids
// [u0, u0 + n) (a tile) into key[n] (model 0's term written: weights and exponentials are >= 0), from its
// exponentials e, the same values as tile_keys. Gather and add are one pass over the single ids (first_ids); at
// the many-to-one union ids (first_ids -1) that pass adds a term of 0 (key + 0 is key: keys are >= 0, never
// -0; or 0 for the first model), and their terms come after, from the sums over all their ids (multi), as
// tile_exps forms them: 0 + the ids in ascending order. A later model with few single ids (Args::sparse) adds
// them pair by pair instead, leaving out those terms of 0: the same values, without a 16-lane gather for a
// few lanes (a gather costs the same with lanes masked off; on AMD Zen 4 ~6 ns even from L1).
void tile_add_model(const Args& a, int64_t b, const RowStats& st, int m, const float* e, int64_t u0, int64_t n,
                    float* key) {
  const float w = a.weights[b * a.num_models + m], inv_s = st.inv_s[m];
  const bool first = m == 0;
  if (a.num_sparse[m] > 0) {  // never model 0 (make_args)
    const Extra *p, *end;
    for (pairs_in(a.sparse[m], a.num_sparse[m], u0, n, &p, &end); p < end; ++p) {
      key[p->u - u0] = key[p->u - u0] + w * (e[p->v] * inv_s);
    }
  } else {
    const int32_t* first_id = a.first_ids[m] + u0;
    for (int64_t i = avx512_paths_usable() ? gather_add_prob_avx512(e, first_id, n, w, inv_s, first, key) : 0;
         i < n; ++i) {
      const float t = w * ((first_id[i] >= 0 ? e[first_id[i]] : 0.0f) * inv_s);
      key[i] = first ? t : key[i] + t;
    }
  }
  const Extra* pairs = reinterpret_cast<const Extra*>(a.multi[m]);
  multi_terms(a, m, u0, n, w, inv_s, first, [&](int64_t j) { return e[pairs[j].v]; }, key);
}

// Mode "prob" + absent "zero" with the row layout (Work::row0): model 0's term, the first (written), from the
// key row itself, where the exponential pass put model 0's values: w * (e * inv_s) where model 0 has one id
// for the union id (Args::row_single), a term of 0 elsewhere; then the many-to-one union ids' terms from the
// members' values in side, summed as tile_exps sums them (0 + the ids in ascending order). The same values as
// tile_add_model. u0 is a multiple of 16 (of kTile).
__attribute__((target("avx512f"))) void tile_row0(const Args& a, int64_t b, const RowStats& st, const float* side,
                                                  int64_t u0, int64_t n, float* key) {
  const float w = a.weights[b * a.num_models], inv_s = st.inv_s[0];
  const __m512 w_v = _mm512_set1_ps(w), inv_v = _mm512_set1_ps(inv_s);
  const int32_t* single = a.row_single + (u0 >> 4);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = _mm512_maskz_loadu_ps(static_cast<__mmask16>(single[i >> 4]), key + i);
    _mm512_storeu_ps(key + i, _mm512_mul_ps(w_v, _mm512_mul_ps(e, inv_v)));
  }
  for (; i < n; ++i) key[i] = w * ((((single[i >> 4] >> (i & 15)) & 1) ? key[i] : 0.0f) * inv_s);
  multi_terms(a, 0, u0, n, w, inv_s, true, [&](int64_t j) { return side[a.row_slot[j]]; }, key);
}

// key(u) of batch row b for union ids [u0, u0 + n), n <= kTile, into key[n], from the row's exponentials
// e[m] [V_m].
void tile_keys(const Args& a, int64_t b, const RowStats& st, float* const* e, int64_t u0, int64_t n, float* key) {
  const int M = a.num_models;
  const float* w = a.weights + b * M;
  const float* cpat = a.cpat + b * (int64_t{1} << M);
  const uint8_t mask = static_cast<uint8_t>((1u << M) - 1u);
  const uint8_t* present = a.present + u0;
  float E[kTile], tile_acc[kTile];
  uint8_t used[kTile];
  // Mode "prob" + absent "zero": the key is the sum itself, accumulated in place.
  const bool direct = !a.logprob && !a.renormalize;
  float* acc = direct ? key : tile_acc;
  std::fill(acc, acc + n, 0.0f);
  std::fill(used, used + n, uint8_t{0});
  for (int m = 0; m < M; ++m) {
    tile_exps(a, m, e[m], u0, n, E);
    if (!a.logprob) {
      add_prob(acc, E, n, w[m], st.inv_s[m]);
    } else if (w[m] > 0.0f) {
      add_logprob(acc, used, E, present, n, w[m], st.inv_s[m], m, a.renormalize);
    }
  }
  if (a.renormalize) {
    for (int64_t i = 0; i < n; ++i) {
      key[i] = ensemble::combine_finish(acc[i], used[i] != 0, cpat[present[i] & mask], a.logprob);
    }
  } else if (!direct) {  // c(u) == 1: the same values, vectorised
    finish_unit(acc, used, n, a.logprob, key);
  }
}

PYFUSE_HOT bool all_mapped(const int32_t* fwd, int64_t n) {
  int32_t lowest = 0;
  for (int64_t i = 0; i < n; ++i) lowest = std::min(lowest, fwd[i]);
  return lowest >= 0;
}

// Lanes again: max and fixed-point sum only vectorise this way.
PYFUSE_HOT float max_of(const float* x, int64_t n) {
  float lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = kNegInf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
  }
  float mx = kNegInf;
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  for (int j = 0; j < kLanes; ++j) mx = lane[j] > mx ? lane[j] : mx;
  return mx;
}

PYFUSE_HOT int64_t fix_sum(const float* x, int64_t n) {
  int64_t z = 0;
  for (int64_t i = 0; i < n; ++i) z += fix(x[i]);
  return z;
}

// Logprob keys -> scores exp_det(key - kmax) in place (0 when no key is finite).
PYFUSE_HOT void exp_scores(float* x, int64_t n, float kmax) {
  const bool any = kmax > kNegInf;
  for (int64_t i = 0; i < n; ++i) x[i] = ensemble::select(any, exp_det(x[i] - kmax), 0.0f);
}

PYFUSE_HOT void scale(float* x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * s;
}

// Runs the phases in order. With at least one row per thread, each thread takes whole rows through every
// phase (a row's logits stay in its core's cache and no barrier is needed); otherwise every phase is split
// over all (row, item) pairs with a barrier between phases, so a single row uses every core. Items only
// write their own outputs and phases reduce with max / integer sums, so both give the same bits.
bool row_mode(int64_t batch) { return batch >= omp_get_max_threads(); }

// The fixed work grid of one call: statistics items (row, model, chunk) and key items (row, tile). Split
// mode uses quarter chunks: with a few rows, 9 items of up to 32768 ids left one of two threads waiting at
// the barrier for up to a chunk (any chunking gives the same bits).
struct Grid {
  const Args& a;
  int64_t chunk, chunks_per_row = 0, tiles;
  int64_t chunk_start[ensemble::kMaxModels + 1];  // first item of each model within a row
  explicit Grid(const Args& args)
      : a(args), chunk(row_mode(args.batch) ? kChunk : kChunk / 4), tiles((args.union_size + kTile - 1) / kTile) {
    for (int m = 0; m < a.num_models; ++m) {
      chunk_start[m] = chunks_per_row;
      chunks_per_row += std::max<int64_t>(1, (a.vocab[m] + chunk - 1) / chunk);
    }
    chunk_start[a.num_models] = chunks_per_row;
  }
  int64_t stat_items() const { return a.batch * chunks_per_row; }
  int64_t key_items() const { return a.batch * tiles; }
  // Item i of the statistics grid as (row, model, v0, v1).
  void stat_item(int64_t i, int64_t* b, int* m, int64_t* v0, int64_t* v1) const {
    *b = i / chunks_per_row;
    const int64_t r = i % chunks_per_row;
    int k = 0;
    while (r >= chunk_start[k + 1]) ++k;
    *m = k;
    *v0 = (r - chunk_start[k]) * chunk;
    *v1 = std::min(*v0 + chunk, a.vocab[k]);
  }
};

// A step of a call: per_row items for each batch row, item i of row b being fn(b * per_row + i).
struct Phase {
  int64_t per_row;
  std::function<void(int64_t)> fn;
};

// In row mode a thread claims its next row before it works on the current one (rows are still handed out
// dynamically, in order), so a phase can fetch ahead from the next row: t_ahead_row (-1: none, or split mode).
thread_local int64_t t_ahead_row = -1;

void run(int64_t batch, const std::vector<Phase>& phases) {
  if (row_mode(batch)) {
    std::atomic<int64_t> next_row{0};
#pragma omp parallel
    {
      for (int64_t b = next_row++; b < batch;) {
        const int64_t ahead = next_row++;
        t_ahead_row = ahead < batch ? ahead : -1;
        for (const Phase& p : phases) {
          for (int64_t i = 0; i < p.per_row; ++i) p.fn(b * p.per_row + i);
        }
        b = ahead;
      }
      t_ahead_row = -1;
    }
    return;
  }
#pragma omp parallel
  for (const Phase& p : phases) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < batch * p.per_row; ++i) p.fn(i);
  }
}

// Per-row results of the key pass: the first maximum key and its id, and the fixed-point total Z of the
// scores with 1 / Z.
struct RowKeys {
  std::vector<float> kmax, inv_z;
  std::vector<int64_t> best, z;
};

// Appends to_union[v] for the valid ids with y_v >= thr. Hits are rare (well under 1 % of a row): short
// blocks screened with a vectorised count keep the scalar re-scan of a hit block cheap.
template <int DT>
PYFUSE_INLINE void candidates_above_t(const void* x, const int32_t* fwd, int64_t V, float inv_t, float thr,
                                      std::vector<int64_t>& out) {
  constexpr int64_t kBlock = 64;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = std::min(kBlock, V - v0);
    int32_t hits = 0;
    for (int64_t v = v0; v < v0 + n; ++v) hits += load_float(x, DT, v) * inv_t >= thr;
    if (hits == 0) continue;
    for (int64_t v = v0; v < v0 + n; ++v) {
      if (fwd[v] >= 0 && load_float(x, DT, v) * inv_t >= thr) out.push_back(fwd[v]);
    }
  }
}

#define PYFUSE_CANDIDATES(name, DT)                                                                          \
  PYFUSE_HOT void name(const void* x, const int32_t* f, int64_t V, float t, float thr, std::vector<int64_t>& o) { \
    candidates_above_t<DT>(x, f, V, t, thr, o);                                                              \
  }
PYFUSE_CANDIDATES(candidates_f32, kFloat32)
PYFUSE_CANDIDATES(candidates_f16, kFloat16)
PYFUSE_CANDIDATES(candidates_bf16, kBFloat16)

// Appends the union ids of row b's model m with an id at y_v >= thr, and the many-to-one union ids (several
// ids of model m: their sum may pass) with an id at y_v >= thr_multi (<= thr). A union id may be appended
// more than once.
// near: the ids the exponential pass recorded for this row and model, per statistics chunk (a superset of both
// sets; see greedy_prob_zero): filtering that short list finds both. Without it (null), the row is screened for
// the first set and the second comes from the map's list of the many-to-one ids (a few % of V), not from a
// second screen of the row: with thr_multi a few units of y lower, that screen hit most blocks.
void candidates_above(const Args& a, int m, int64_t b, float thr, float thr_multi, const std::vector<int32_t>* near,
                      int64_t near_chunks, std::vector<int64_t>& out) {
  const void* x = row_ptr(a, m, b);
  const float inv_t = a.inv_temp[m];
  const int32_t* fwd = a.to_union[m];
  const int32_t* rev = a.rev_offsets[m];
  if (near != nullptr) {
    for (int64_t c = 0; c < near_chunks; ++c) {
      for (int32_t v : near[c]) {
        const float y = load_float(x, a.dtype, v) * inv_t;
        if (!(y >= thr_multi)) continue;
        const int32_t u = fwd[v];
        if (y >= thr || rev[u + 1] - rev[u] > 1) out.push_back(u);
      }
    }
    return;
  }
  auto fn = a.dtype == kFloat32 ? candidates_f32 : a.dtype == kFloat16 ? candidates_f16 : candidates_bf16;
  fn(x, fwd, a.vocab[m], inv_t, thr, out);
  const Extra* extra = reinterpret_cast<const Extra*>(a.multi[m]);  // every id of the many-to-one union ids
  for (int64_t p = 0; p < a.num_multi[m]; ++p) {
    if (load_float(x, a.dtype, extra[p].v) * inv_t >= thr_multi) out.push_back(extra[p].u);
  }
}

// Greedy next token for mode "prob", absent "zero", without computing every key: with tau the best key
// of the models' top-1 ids, a union id can reach tau only if some model has w_m * P_m(u) >= tau / M, i.e.
// e_v >= tau / (M * w_m * inv_s_m) for one of its ids (many-to-one ids are always checked). Half that
// threshold leaves room for rounding; the candidates' keys are computed exactly as in tile_keys.
//
// The threshold is at least 0.5 / M (tau >= w_m * inv_s_m: model m's top id has e = 1), i.e. z_v = y_v - mx_m >=
// log(0.5 / M) - 0.01, and the many-to-one threshold log(max_mult_m) lower: near_z_min below both is a bound
// the exponential pass can record against before tau is known (near[m]: that row's recorded ids per chunk of
// model m, or null).
double log_max_mult(const Args& a, int m) {
  return std::log(static_cast<double>(std::max<int64_t>(a.max_mult[m], 1)));
}
float near_z_min(const Args& a, int m) {
  return static_cast<float>(std::log(0.5 / a.num_models) - 0.05 - log_max_mult(a, m));
}

int64_t greedy_prob_zero(const Args& a, int64_t b, const RowStats& st, const std::vector<int32_t>* const* near,
                         int64_t const* near_chunks, std::vector<int64_t>& cand, float* best_key) {
  const int M = a.num_models;
  const float* w = a.weights + b * M;
  cand.clear();
  for (int m = 0; m < M; ++m) {
    if (st.top[m] >= 0 && w[m] > 0.0f) cand.push_back(a.to_union[m][st.top[m]]);
  }
  float tau = 0.0f;
  for (int64_t u : cand) tau = std::max(tau, key_of(a, b, st, u));
  if (!(tau > 0.0f)) {
    *best_key = 0.0f;
    return -1;
  }
  for (int m = 0; m < M; ++m) {
    if (!(w[m] > 0.0f)) continue;
    // e_v >= thr  <=>  y_v >= mx + log(thr); 0.01 more slack for the rounding of y and exp_det.
    const double thr = 0.5 * tau / (static_cast<double>(M) * w[m] * st.inv_s[m]);
    // A union id with n model ids needs one of them at >= thr / n.
    const double ythr = st.mx[m] + std::log(thr) - 0.01;
    candidates_above(a, m, b, static_cast<float>(ythr),
                     static_cast<float>(ythr - log_max_mult(a, m)),
                     near[m], near_chunks[m], cand);
  }
  int64_t best = -1;
  float kbest = 0.0f;
  for (int64_t u : cand) {
    const float k = key_of(a, b, st, u);
    if (k > kbest || (k == kbest && best >= 0 && u < best)) {
      kbest = k;
      best = u;
    }
  }
  *best_key = kbest;
  return best;
}

// Scratch and phases of one call, sized by the grid.
struct Work {
  const Args& a;
  Grid grid;
  std::vector<float> pmax;
  std::vector<int64_t> pat, psum;
  std::vector<float> tmax;
  std::vector<int64_t> targ, tsum;
  RowKeys rk;
  // Exponential rows (float32, sum of V_m per slot): one slot per thread with whole rows per thread, else
  // one per row; none when only the statistics are needed. Every id's value is written before it is read.
  int64_t slot_size = 0, model_off[ensemble::kMaxModels] = {};
  float* exps = nullptr;  // scratch slot 0
  // Greedy "prob"/"zero" next_token on the AVX-512 path: per statistics item, the ids near the row's max
  // (NearIds); empty when not recorded.
  std::vector<std::vector<int32_t>> near;
  // Per statistics chunk of a row: whether every id of it is mapped (most are: the unmapped ids are padding and
  // the odd special token). Then the passes over the logits do not read the map, which costs as much memory
  // traffic as float32 logits (the max pass took 2.8x as long with it). One read of the maps per call.
  std::vector<uint8_t> dense;
  // Mode "prob" + absent "zero" with the map's row layout on the AVX-512 path: model 0's exponentials go
  // straight into the key rows (keys: [B, U], or [slots, U] when key_per_slot), its exps_of slot holds only
  // its many-to-one members' values, and the key pass reads its term in place (tile_row0).
  bool row0 = false;
  float* keys = nullptr;
  bool key_per_slot = false;
  Work(const Args& args, bool store_exps)
      : a(args), grid(args), pmax(grid.stat_items()), pat(grid.stat_items()), psum(grid.stat_items()),
        tmax(grid.key_items()), targ(grid.key_items()), tsum(grid.key_items()), dense(grid.chunks_per_row) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < grid.chunks_per_row; ++c) {
      int64_t b, v0, v1;
      int m;
      grid.stat_item(c, &b, &m, &v0, &v1);
      dense[c] = all_mapped(a.to_union[m] + v0, v1 - v0);
    }
    for (int m = 0; m < a.num_models; ++m) {
      model_off[m] = slot_size;
      slot_size += a.vocab[m];
    }
    if (store_exps) exps = scratch_floats(0, slot_size * slots());
    row0 = store_exps && a.row_bits != nullptr && !a.logprob && !a.renormalize && avx512_paths_usable();
    rk.kmax.resize(a.batch);
    rk.inv_z.resize(a.batch);
    rk.best.resize(a.batch);
    rk.z.resize(a.batch);
  }

  void record_near() { near.resize(grid.stat_items()); }

  // The first union id u of row b whose running fixed-point sum of the scores r[0..u] exceeds target (-1:
  // none). The key pass's tile sums (tsum: the same fix() terms, summed exactly) skip whole tiles, so only the
  // tile holding u is scanned: the reference's running sum, without a serial walk over U ids.
  int64_t sampled(int64_t b, const float* r, int64_t target) const {
    const int64_t T = grid.tiles;
    int64_t cum = 0, t = 0;
    for (; t + 1 < T && cum + tsum[b * T + t] <= target; ++t) cum += tsum[b * T + t];
    for (int64_t u = t * kTile; u < std::min((t + 1) * kTile, a.union_size); ++u) {
      cum += fix(r[u]);
      if (cum > target) return u;
    }
    return -1;
  }

  // Whether the ids near a row max mx are recorded: not when |mx| is so large that float rounding could exceed
  // the bound's slack (ulp(mx) <= 2^-10 below 16384).
  bool records_near(float mx) const { return !near.empty() && std::fabs(mx) < 16384.0f; }

  // Row b's recorded ids of model m (max mx; its chunks' lists) into near_m / chunks_m, or null when not recorded.
  void near_of(int64_t b, int m, float mx, const std::vector<int32_t>** near_m, int64_t* chunks_m) const {
    const bool recorded = records_near(mx);
    *near_m = recorded ? &near[first_chunk(b, m)] : nullptr;
    *chunks_m = recorded ? last_chunk(b, m) - first_chunk(b, m) : 0;
  }

  float* key_row(int64_t b) { return keys + (key_per_slot ? slot(b) : b) * a.union_size; }

  float* exps_of(int64_t b, int m) {
    if (exps == nullptr) return nullptr;
    return exps + slot(b) * slot_size + model_off[m];
  }

  // Per-call scratch rows: one per thread when threads take whole rows, else one per row.
  int64_t slots() const { return row_mode(a.batch) ? omp_get_max_threads() : a.batch; }
  int64_t slot(int64_t b) const { return row_mode(a.batch) ? omp_get_thread_num() : b; }

  // Statistics items of row b's model m: [first, last).
  int64_t first_chunk(int64_t b, int64_t m) const { return b * grid.chunks_per_row + grid.chunk_start[m]; }
  int64_t last_chunk(int64_t b, int64_t m) const { return b * grid.chunks_per_row + grid.chunk_start[m + 1]; }

  // Max y of row b's model m and the lowest id of the max, from the chunk maxima (in id order: strict > keeps
  // the lowest id).
  void row_max(int64_t b, int m, float* mx_out, int64_t* top) const {
    float mx = kNegInf;
    int64_t at = -1;
    for (int64_t i = first_chunk(b, m); i < last_chunk(b, m); ++i) {
      at = pmax[i] > mx ? pat[i] : at;
      mx = pmax[i] > mx ? pmax[i] : mx;
    }
    *mx_out = mx * a.inv_temp[m];
    *top = at;
  }

  // Row b's statistics, from the chunk results (a few values per model: recomputed where needed rather
  // than stored, which would cost a barrier).
  RowStats row_stats(int64_t b) const {
    RowStats st;
    for (int m = 0; m < a.num_models; ++m) {
      row_max(b, m, &st.mx[m], &st.top[m]);
      int64_t s = 0;
      for (int64_t i = first_chunk(b, m); i < last_chunk(b, m); ++i) s += psum[i];
      st.inv_s[m] = unfix_recip(s);
    }
    return st;
  }

  // Chunk maxima, then chunk sums (and exponentials, when stored).
  void stats_phases(std::vector<Phase>& out) {
    out.push_back({grid.chunks_per_row, [this](int64_t i) {
                     int64_t b, v0, v1;
                     int m;
                     grid.stat_item(i, &b, &m, &v0, &v1);
                     chunk_max(a.dtype, row_ptr(a, m, b), a.to_union[m], v0, v1, dense[i % grid.chunks_per_row],
                               &pmax[i], &pat[i]);
                   }});
    out.push_back({grid.chunks_per_row, [this](int64_t i) {
                     int64_t b, v0, v1, top;
                     int m;
                     grid.stat_item(i, &b, &m, &v0, &v1);
                     float mx;
                     row_max(b, m, &mx, &top);
                     NearIds rec;
                     if (records_near(mx)) {
                       near[i].clear();
                       rec = {near_z_min(a, m), &near[i]};
                     }
                     // Not when storing exponentials: the row's stored ones (4 bytes per id) and the next
                     // row's logits do not both fit L2, and the key pass gathers from the former
                     // (union_probs B=64 qwen2+llama3: ~5-10% faster without).
                     const char* pf = (t_ahead_row < 0 || exps != nullptr)
                                          ? nullptr : static_cast<const char*>(row_ptr(a, m, t_ahead_row));
                     const bool to_row = row0 && m == 0;
                     const RowOut ro{to_row ? key_row(b) : nullptr, exps_of(b, m), a.row_bits, a.row_start,
                                     a.row_mstart};
                     psum[i] = chunk_expsum(a.dtype, row_ptr(a, m, b), a.to_union[m], v0, v1,
                                            dense[i % grid.chunks_per_row], a.inv_temp[m], mx, exps_of(b, m),
                                            to_row ? &ro : nullptr, rec, pf);
                   }});
  }

  // Keys of every (row, union id) into keys [B, U] (per_slot: [slots, U], row b at slot(b)); when `scores`,
  // turned into scores r in place (logprob: exp_det(key - max key)) with the row's first maximum key and Z
  // in rk.
  void key_phases(std::vector<Phase>& out, float* keys_out, bool per_slot, bool scores) {
    const int64_t U = a.union_size, T = grid.tiles;
    keys = keys_out;  // the statistics phases, run before, write model 0's values there when row0
    key_per_slot = per_slot;
    // A tile's first maximum key and (mode "prob": the keys are the scores) its fixed-point sum.
    auto tile_stats = [this](int64_t i, int64_t u0, int64_t n, const float* key) {
      tmax[i] = max_of(key, n);
      targ[i] = u0 + (std::find(key, key + n, tmax[i]) - key);
      tsum[i] = a.logprob ? 0 : fix_sum(key, n);
    };
    if (!a.logprob && !a.renormalize) {
      // Plain weighted sums: one model at a time over a group of the row's tiles, so that only that model's
      // exponentials are gathered from (a smaller random-access set than all models' at once), while the
      // group's keys (128 KB) stay in L2 from one model to the next (per model over the whole row: 5-8% slower).
      constexpr int64_t kGroup = 16;  // tiles
      const int64_t G = (T + kGroup - 1) / kGroup;
      out.push_back({G, [this, scores, tile_stats, U, T, G](int64_t i) {
                       const int64_t b = i / G, t0 = (i % G) * kGroup, t1 = std::min(T, t0 + kGroup);
                       const RowStats st = row_stats(b);
                       float* row = key_row(b);
                       for (int m = 0; m < a.num_models; ++m) {
                         for (int64_t t = t0; t < t1; ++t) {
                           const int64_t u0 = t * kTile, n = std::min(kTile, U - u0);
                           if (row0 && m == 0) {
                             tile_row0(a, b, st, exps_of(b, 0), u0, n, row + u0);
                           } else {
                             tile_add_model(a, b, st, m, exps_of(b, m), u0, n, row + u0);
                           }
                         }
                       }
                       for (int64_t t = t0; t < t1 && scores; ++t) {
                         const int64_t u0 = t * kTile;
                         tile_stats(b * T + t, u0, std::min(kTile, U - u0), row + u0);
                       }
                     }});
    } else {
      out.push_back({T, [this, scores, tile_stats, U, T](int64_t i) {
                       const int64_t b = i / T, u0 = (i % T) * kTile, n = std::min(kTile, U - u0);
                       float* key = key_row(b) + u0;
                       float* e[ensemble::kMaxModels];
                       for (int m = 0; m < a.num_models; ++m) e[m] = exps_of(b, m);
                       tile_keys(a, b, row_stats(b), e, u0, n, key);
                       if (scores) tile_stats(i, u0, n, key);
                     }});
    }
    if (!scores) return;
    out.push_back({1, [this, T](int64_t b) {
                     float mx = tmax[b * T];
                     int64_t at = targ[b * T];
                     for (int64_t t = 1; t < T; ++t) {
                       at = tmax[b * T + t] > mx ? targ[b * T + t] : at;
                       mx = tmax[b * T + t] > mx ? tmax[b * T + t] : mx;
                     }
                     rk.kmax[b] = mx;
                     rk.best[b] = at;
                   }});
    if (a.logprob) {
      out.push_back({T, [this, U, T](int64_t i) {
                       const int64_t b = i / T, u0 = (i % T) * kTile, n = std::min(kTile, U - u0);
                       float* r = key_row(b) + u0;
                       exp_scores(r, n, rk.kmax[b]);
                       tsum[i] = fix_sum(r, n);
                     }});
    }
    out.push_back({1, [this, T](int64_t b) {
                     int64_t z = 0;
                     for (int64_t t = 0; t < T; ++t) z += tsum[b * T + t];
                     rk.z[b] = z;
                     rk.inv_z[b] = unfix_recip(z);
                   }});
  }
};

}  // namespace

void union_probs(const Args& a, float* out) {
  const bool normalize = a.logprob || a.renormalize;  // mode "prob" + absent "zero" already sums to 1
  const int64_t U = a.union_size, T = (U + kTile - 1) / kTile;
  Work w(a, true);
  std::vector<Phase> phases;
  w.stats_phases(phases);
  w.key_phases(phases, out, false, normalize);
  if (normalize) {
    phases.push_back({T, [&](int64_t i) {
                        const int64_t b = i / T, u0 = (i % T) * kTile;
                        scale(out + b * U + u0, std::min(kTile, U - u0), w.rk.inv_z[b]);
                      }});
  }
  run(a.batch, phases);
}

// Greedy "prob"/"zero" rows never touch the union; the other cases compute a row's scores (as union_probs)
// into a [U] scratch row (one per thread, or per row with fewer rows than threads) and pick from it.
void next_token(const Args& a, bool greedy, uint64_t seed, uint32_t stream, int64_t* union_ids, int64_t* model_ids,
                float* prob) {
  const int64_t U = a.union_size;
  const bool normalize = a.logprob || a.renormalize;
  const bool fast = greedy && !normalize;
  Work w(a, !fast);
  if (fast && avx512_paths_usable()) w.record_near();
  float* score = fast ? nullptr : scratch_floats(1, static_cast<size_t>(w.slots()) * U);  // written before read
  std::vector<Phase> phases;
  w.stats_phases(phases);
  if (!fast) w.key_phases(phases, score, true, true);
  phases.push_back({1, [&](int64_t b) {
                      int64_t chosen = -1;
                      float p = 0.0f;
                      if (fast) {
                        std::vector<int64_t> cand;
                        const RowStats st = w.row_stats(b);
                        const std::vector<int32_t>* near[ensemble::kMaxModels];
                        int64_t chunks[ensemble::kMaxModels];
                        for (int m = 0; m < a.num_models; ++m) w.near_of(b, m, st.mx[m], &near[m], &chunks[m]);
                        chosen = greedy_prob_zero(a, b, st, near, chunks, cand, &p);
                      } else {
                        const float* r = score + w.slot(b) * U;
                        const float inv_z = normalize ? w.rk.inv_z[b] : 1.0f;
                        if (greedy) {
                          const bool no_key = a.logprob ? !(w.rk.kmax[b] > kNegInf) : !(w.rk.kmax[b] > 0.0f);
                          chosen = no_key ? -1 : w.rk.best[b];
                        } else if (w.rk.z[b] > 0) {
                          chosen = w.sampled(b, r, ensemble::sample_target(w.rk.z[b], seed, b, stream));
                        }
                        p = chosen < 0 ? 0.0f : r[chosen] * inv_z;
                      }
                      union_ids[b] = chosen;
                      prob[b] = p;
                      for (int m = 0; m < a.num_models; ++m) {
                        model_ids[b * a.num_models + m] = chosen < 0 ? -1 : a.from_union[m][chosen];
                      }
                    }});
  run(a.batch, phases);
}

namespace {

// The k best (value desc, id asc) valid ids of one model row, as sort keys, best first.
template <int DT>
int top_keys(const void* x, const int32_t* fwd, int64_t V, int k, int64_t* best) {
  int n = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (fwd[v] < 0) continue;
    const int64_t key = ensemble::sort_key(load_float(x, DT, v), v);
    if (n == k && key <= best[k - 1]) continue;
    int i = n < k ? n++ : k - 1;
    for (; i > 0 && best[i - 1] < key; --i) best[i] = best[i - 1];
    best[i] = key;
  }
  return n;
}

int top_keys(int32_t dtype, const void* x, const int32_t* fwd, int64_t V, int k, int64_t* best) {
  if (dtype == kFloat32) return top_keys<kFloat32>(x, fwd, V, k, best);
  if (dtype == kFloat16) return top_keys<kFloat16>(x, fwd, V, k, best);
  return top_keys<kBFloat16>(x, fwd, V, k, best);
}

inline int64_t key_id(int64_t key) { return 4294967295LL - (key & 0xFFFFFFFFLL); }

}  // namespace

void union_topk(const Args& a, int k, float* probs, int64_t* union_ids) {
  const int M = a.num_models;
#pragma omp parallel
  {
    std::vector<int64_t> best(k), cand(static_cast<size_t>(M) * k);
    std::vector<float> P(static_cast<size_t>(M) * M * k), key(static_cast<size_t>(M) * k), score(key.size());
    std::vector<int> order(static_cast<size_t>(M) * k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      float mx[ensemble::kMaxModels];
      int nc = 0;
      for (int m = 0; m < M; ++m) {
        const void* x = row_ptr(a, m, b);
        const int got = top_keys(a.dtype, x, a.to_union[m], a.vocab[m], k, best.data());
        mx[m] = load_float(x, a.dtype, key_id(best[0])) * a.inv_temp[m];
        for (int i = 0; i < got; ++i) cand[nc++] = a.to_union[m][key_id(best[i])];
      }
      std::sort(cand.begin(), cand.begin() + nc);
      nc = static_cast<int>(std::unique(cand.begin(), cand.begin() + nc) - cand.begin());
      // Each model's mass on each candidate, renormalised over the candidates.
      for (int m = 0; m < M; ++m) {
        const void* x = row_ptr(a, m, b);
        float* Pm = P.data() + static_cast<size_t>(m) * M * k;
        int64_t d = 0;
        for (int c = 0; c < nc; ++c) {
          float E = 0.0f;
          for (int64_t j = a.rev_offsets[m][cand[c]]; j < a.rev_offsets[m][cand[c] + 1]; ++j) {
            E = E + exp_det(load_float(x, a.dtype, a.rev_ids[m][j]) * a.inv_temp[m] - mx[m]);
          }
          Pm[c] = E;
          d += fix(E);
        }
        const float inv_d = unfix_recip(d);
        for (int c = 0; c < nc; ++c) Pm[c] = Pm[c] * inv_d;
      }
      const float* w = a.weights + b * M;
      const float* cpat = a.cpat + b * (int64_t{1} << M);
      for (int c = 0; c < nc; ++c) {
        const uint8_t pat = a.present[cand[c]] & static_cast<uint8_t>((1u << M) - 1u);
        float acc = 0.0f;
        bool used = false;
        for (int m = 0; m < M; ++m) {
          ensemble::combine_step(acc, used, w[m], P[static_cast<size_t>(m) * M * k + c], (pat >> m) & 1, a.logprob,
                                 a.renormalize);
        }
        key[c] = ensemble::combine_finish(acc, used, cpat[pat], a.logprob);
        order[c] = c;
      }
      // Key desc, union id asc (candidates are sorted by id); bit-pattern keys give a total order even for NaN.
      std::stable_sort(order.begin(), order.begin() + nc, [&](int i, int j) {
        return ensemble::sort_key(key[i], 0) > ensemble::sort_key(key[j], 0);
      });
      float kmax = kNegInf;
      for (int c = 0; c < nc; ++c) kmax = key[c] > kmax ? key[c] : kmax;
      int64_t z = 0;
      for (int c = 0; c < nc; ++c) {
        score[c] = a.logprob ? (kmax > kNegInf ? exp_det(key[c] - kmax) : 0.0f) : key[c];
        z += fix(score[c]);
      }
      const float inv_z = unfix_recip(z);
      for (int i = 0; i < k; ++i) {
        const bool have = i < nc;
        probs[b * k + i] = have ? score[order[i]] * inv_z : 0.0f;
        union_ids[b * k + i] = have ? cand[order[i]] : -1;
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyfuse
