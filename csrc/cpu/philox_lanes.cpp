// Philox4x32-10 uniforms over consecutive counters with AVX-512 / AVX2 intrinsics.
//
// The rounds are in cpu/philox_rounds.inc, compiled once per ISA. Why intrinsics: written over plain uint32
// lane arrays, GCC widens the 32x32->64 products to full 64-bit multiplies (three vpmuludq each plus shifts
// and adds): pyfuse.rand of 16M took 80 ms that way, 21 ms here (2 threads, AVX-512). Here every counter
// word lives in the low half of a 64-bit lane, so one vpmuludq gives both halves of a product; the high
// halves of the lanes carry garbage that nothing reads (vpmuludq and the final vpmovqd read low halves only).
// Several independent vectors per iteration hide the multiply latency across the 10 dependent rounds.
#include "cpu/philox_lanes.h"

#include <immintrin.h>
#include <string.h>

#include <algorithm>

#include "pyfuse/philox.h"

namespace pyfuse {
namespace cpu {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr float kToUnit = 0x1.fffffep-32f;  // tl.rand's scale (see philox::uint_to_uniform)

void uniforms_scalar(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  for (int64_t l = 0; l < count; ++l) u[l] = philox::uniform(seed, first + static_cast<uint64_t>(l), stream, purpose);
}

// Packed layout (philox::packed_uniform): element e takes word e % 4 of counter e / 4.
void packed_scalar(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  for (int64_t l = 0; l < count;) {
    const uint64_t e = first + static_cast<uint64_t>(l);
    const philox::U32x4 w = philox::randint4x(seed, e >> 2, stream, purpose);
    for (uint64_t word = e & 3; word < 4 && l < count; ++word) u[l++] = philox::uint_to_uniform(w.v[word]);
  }
}

// Counter words live in the low half of each 64-bit lane; high halves carry garbage that nothing reads.
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

struct Isa {
  using V = __m512i;
  static constexpr int kLanes = 8;
  static V set1(uint64_t x) { return _mm512_set1_epi64(static_cast<int64_t>(x)); }
  static V index(uint64_t first) { return _mm512_add_epi64(set1(first), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)); }
  static V mul(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V hi(V a) { return _mm512_srli_epi64(a, 32); }
  static V xor2(V a, V b) { return _mm512_xor_si512(a, b); }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
};

#include "cpu/philox_rounds.inc"

constexpr int kVec = 4;  // 4 registers (32 counters) per step: enough to hide the multiply latency
constexpr int kStep = 8 * kVec;

void step(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u) {
  __m512i w0[kVec];
  philox_words0<kVec>(seed, first, stream, purpose, w0);
  const __m256 scale = _mm256_set1_ps(kToUnit);
  for (int v = 0; v < kVec; ++v) {
    const __m256i bits = _mm512_cvtepi64_epi32(w0[v]);                    // low halves
    const __m256i s = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));  // s < 0 ? ~s : s
    _mm256_storeu_ps(u + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
  }
}

// Packed layout: kVec x 8 counters from first / 4 (first a multiple of 4), 4 uniforms each, in element order.
constexpr int kPackedStep = 4 * kStep;

inline void store_uniforms16(float* u, __m512i bits) {
  const __m512i s = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));  // s < 0 ? ~s : s
  _mm512_storeu_ps(u, _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(kToUnit)));
}

void packed_step(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u) {
  __m512i w[4][kVec];
  philox_words4<kVec>(seed, first >> 2, stream, purpose, w);
  // Per counter q (a 64-bit lane): a_q = (word 0, word 1), b_q = (word 2, word 3) as 32-bit pairs; then the
  // lanes interleave as a_0 b_0 a_1 b_1 ... (unpack within 128-bit quarters, then one two-source permute each).
  const __m512i first_half = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second_half = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int v = 0; v < kVec; ++v) {
    const __m512i a = _mm512_mask_blend_epi32(0xAAAA, w[0][v], _mm512_slli_epi64(w[1][v], 32));
    const __m512i b = _mm512_mask_blend_epi32(0xAAAA, w[2][v], _mm512_slli_epi64(w[3][v], 32));
    const __m512i even = _mm512_unpacklo_epi64(a, b), odd = _mm512_unpackhi_epi64(a, b);
    store_uniforms16(u + 32 * v, _mm512_permutex2var_epi64(even, first_half, odd));
    store_uniforms16(u + 32 * v + 16, _mm512_permutex2var_epi64(even, second_half, odd));
  }
}

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {

struct Isa {
  using V = __m256i;
  static constexpr int kLanes = 4;
  static V set1(uint64_t x) { return _mm256_set1_epi64x(static_cast<int64_t>(x)); }
  static V index(uint64_t first) { return _mm256_add_epi64(set1(first), _mm256_set_epi64x(3, 2, 1, 0)); }
  static V mul(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V hi(V a) { return _mm256_srli_epi64(a, 32); }
  static V xor2(V a, V b) { return _mm256_xor_si256(a, b); }
  static V xor3(V a, V b, V c) { return xor2(xor2(a, b), c); }
};

#include "cpu/philox_rounds.inc"

constexpr int kVec = 3;  // 3 registers (12 counters) per step: with the constants, all 16 ymm registers
constexpr int kStep = 4 * kVec;

void step(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u) {
  __m256i w0[kVec];
  philox_words0<kVec>(seed, first, stream, purpose, w0);
  alignas(32) uint32_t bits[8 * kVec];
  for (int v = 0; v < kVec; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(bits) + v, w0[v]);
  for (int l = 0; l < 4 * kVec; ++l) u[l] = philox::uint_to_uniform(bits[2 * l]);  // low half of each 64-bit lane
}

constexpr int kPackedStep = 4 * kStep;

void packed_step(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u) {
  __m256i w[4][kVec];
  philox_words4<kVec>(seed, first >> 2, stream, purpose, w);
  alignas(32) uint32_t bits[4][8 * kVec];
  for (int word = 0; word < 4; ++word) {
    for (int v = 0; v < kVec; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(bits[word]) + v, w[word][v]);
  }
  for (int q = 0; q < 4 * kVec; ++q) {  // counter q: low half of 64-bit lane q
    for (int word = 0; word < 4; ++word) u[4 * q + word] = philox::uint_to_uniform(bits[word][2 * q]);
  }
}

}  // namespace avx2
#pragma GCC pop_options

// count uniforms in steps of kStep counters; the tail goes through a scratch step.
template <int kStep, void (*kStepFn)(uint64_t, uint64_t, uint32_t, uint32_t, float*)>
void run_steps(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  int64_t l = 0;
  for (; l + kStep <= count; l += kStep) kStepFn(seed, first + static_cast<uint64_t>(l), stream, purpose, u + l);
  if (l < count) {
    alignas(64) float tail[kStep];
    kStepFn(seed, first + static_cast<uint64_t>(l), stream, purpose, tail);
    memcpy(u + l, tail, static_cast<size_t>(count - l) * sizeof(float));
  }
}

void uniforms_avx512(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  run_steps<avx512::kStep, avx512::step>(seed, first, stream, purpose, u, count);
}

void uniforms_avx2(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  run_steps<avx2::kStep, avx2::step>(seed, first, stream, purpose, u, count);
}

using UniformsFn = void (*)(uint64_t, uint64_t, uint32_t, uint32_t, float*, int64_t);

// The packed layout from any first element: a head up to the next multiple of 4 (scalar), then whole steps.
template <int kStep, void (*kStepFn)(uint64_t, uint64_t, uint32_t, uint32_t, float*)>
void packed_steps(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  const int64_t head = std::min<int64_t>(count, static_cast<int64_t>((4 - (first & 3)) & 3));
  packed_scalar(seed, first, stream, purpose, u, head);  // packed_scalar works from any first
  run_steps<kStep, kStepFn>(seed, first + static_cast<uint64_t>(head), stream, purpose, u + head, count - head);
}

UniformsFn path(PhiloxIsa isa, PhiloxLayout layout) {
  const bool packed = layout == kPhiloxPacked;
  if (isa == kPhiloxAvx512) return packed ? packed_steps<avx512::kPackedStep, avx512::packed_step> : uniforms_avx512;
  if (isa == kPhiloxAvx2) return packed ? packed_steps<avx2::kPackedStep, avx2::packed_step> : uniforms_avx2;
  return packed ? packed_scalar : uniforms_scalar;
}

}  // namespace

bool philox_isa_usable(PhiloxIsa isa) {
  __builtin_cpu_init();
  if (isa == kPhiloxAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == kPhiloxAvx2) return __builtin_cpu_supports("avx2");
  return isa == kPhiloxAuto || isa == kPhiloxScalar;
}

void philox_uniforms(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count,
                     PhiloxLayout layout) {
  philox_uniforms_isa(kPhiloxAuto, seed, first, stream, purpose, u, count, layout);
}

void philox_uniforms_isa(PhiloxIsa isa, uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u,
                         int64_t count, PhiloxLayout layout) {
  static const PhiloxIsa widest = philox_isa_usable(kPhiloxAvx512) ? kPhiloxAvx512
                                  : philox_isa_usable(kPhiloxAvx2) ? kPhiloxAvx2
                                                                   : kPhiloxScalar;
  static const UniformsFn first_word = path(widest, kPhiloxFirstWord), packed = path(widest, kPhiloxPacked);
  if (isa == kPhiloxAuto) {
    return (layout == kPhiloxPacked ? packed : first_word)(seed, first, stream, purpose, u, count);
  }
  path(isa, layout)(seed, first, stream, purpose, u, count);
}

}  // namespace cpu
}  // namespace pyfuse
