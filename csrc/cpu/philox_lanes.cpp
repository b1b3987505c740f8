// Philox4x32-10 uniforms over consecutive counters with AVX-512 / AVX2 intrinsics.
//
// Why intrinsics: written over plain uint32 lane arrays, GCC widens the 32x32->64 products to full 64-bit
// multiplies (three vpmuludq each plus shifts and adds), about 5x slower than needed. Here every counter
// word lives in the low half of a 64-bit lane, so one vpmuludq gives both halves of a product; the high
// halves of the lanes carry garbage that nothing reads (vpmuludq and the final vpmovqd read low halves only).
// Several independent vectors per iteration hide the multiply latency across the 10 dependent rounds.
#include "cpu/philox_lanes.h"

#include <immintrin.h>
#include <string.h>

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

// ---- AVX-512: 8 counters per register, 4 registers (32 counters) per step ----

constexpr int kVec512 = 4;

__attribute__((target("avx512f"))) void step_avx512(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose,
                                                    float* u) {
  const __m512i ra = _mm512_set1_epi64(kRoundA), rb = _mm512_set1_epi64(kRoundB);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c0[kVec512], c1[kVec512], c2[kVec512], c3[kVec512];
  for (int v = 0; v < kVec512; ++v) {
    const __m512i index = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first + 8u * v)), lane);
    c0[v] = index;
    c1[v] = _mm512_srli_epi64(index, 32);
    c2[v] = _mm512_set1_epi64(stream);
    c3[v] = _mm512_set1_epi64(purpose);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int32_t>(k0)), key1 = _mm512_set1_epi32(static_cast<int32_t>(k1));
    for (int v = 0; v < kVec512; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], rb), pa = _mm512_mul_epu32(c0[v], ra);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[v], key0, 0x96);  // a ^ b ^ c
      c1[v] = pb;
      c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[v], key1, 0x96);
      c3[v] = pa;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  const __m256 scale = _mm256_set1_ps(kToUnit);
  for (int v = 0; v < kVec512; ++v) {
    const __m256i bits = _mm512_cvtepi64_epi32(c0[v]);                    // low halves
    const __m256i s = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));  // s < 0 ? ~s : s
    _mm256_storeu_ps(u + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
  }
}

__attribute__((target("avx512f"))) void uniforms_avx512(uint64_t seed, uint64_t first, uint32_t stream,
                                                        uint32_t purpose, float* u, int64_t count) {
  constexpr int64_t kStep = 8 * kVec512;
  int64_t l = 0;
  for (; l + kStep <= count; l += kStep) step_avx512(seed, first + static_cast<uint64_t>(l), stream, purpose, u + l);
  if (l < count) {
    alignas(64) float tail[kStep];
    step_avx512(seed, first + static_cast<uint64_t>(l), stream, purpose, tail);
    memcpy(u + l, tail, static_cast<size_t>(count - l) * sizeof(float));
  }
}

// ---- AVX2: 4 counters per register, 3 registers (12 counters) per step: 16 ymm registers in all ----

constexpr int kVec256 = 3;

__attribute__((target("avx2"))) void step_avx2(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose,
                                               float* u) {
  const __m256i ra = _mm256_set1_epi64x(kRoundA), rb = _mm256_set1_epi64x(kRoundB);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  __m256i c0[kVec256], c1[kVec256], c2[kVec256], c3[kVec256];
  for (int v = 0; v < kVec256; ++v) {
    const __m256i index = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first + 4u * v)), lane);
    c0[v] = index;
    c1[v] = _mm256_srli_epi64(index, 32);
    c2[v] = _mm256_set1_epi64x(stream);
    c3[v] = _mm256_set1_epi64x(purpose);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int32_t>(k0)), key1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    for (int v = 0; v < kVec256; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], rb), pa = _mm256_mul_epu32(c0[v], ra);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[v]), key0);
      c1[v] = pb;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[v]), key1);
      c3[v] = pa;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  alignas(32) uint32_t bits[4 * kVec256 * 2];
  for (int v = 0; v < kVec256; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(bits) + v, c0[v]);
  for (int l = 0; l < 4 * kVec256; ++l) {  // low half of each 64-bit lane
    int32_t s = static_cast<int32_t>(bits[2 * l]);
    s ^= s >> 31;
    u[l] = static_cast<float>(s) * kToUnit;
  }
}

__attribute__((target("avx2"))) void uniforms_avx2(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose,
                                                   float* u, int64_t count) {
  constexpr int64_t kStep = 4 * kVec256;
  int64_t l = 0;
  for (; l + kStep <= count; l += kStep) step_avx2(seed, first + static_cast<uint64_t>(l), stream, purpose, u + l);
  if (l < count) {
    float tail[kStep];
    step_avx2(seed, first + static_cast<uint64_t>(l), stream, purpose, tail);
    memcpy(u + l, tail, static_cast<size_t>(count - l) * sizeof(float));
  }
}

using UniformsFn = void (*)(uint64_t, uint64_t, uint32_t, uint32_t, float*, int64_t);

bool supported(PhiloxIsa isa) {
  __builtin_cpu_init();
  if (isa == kPhiloxAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == kPhiloxAvx2) return __builtin_cpu_supports("avx2");
  return isa == kPhiloxScalar;
}

UniformsFn path(PhiloxIsa isa) {
  if (isa == kPhiloxAvx512) return uniforms_avx512;
  if (isa == kPhiloxAvx2) return uniforms_avx2;
  return uniforms_scalar;
}

UniformsFn widest() {
  if (supported(kPhiloxAvx512)) return uniforms_avx512;
  if (supported(kPhiloxAvx2)) return uniforms_avx2;
  return uniforms_scalar;
}

}  // namespace

void philox_uniforms(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count) {
  static const UniformsFn fn = widest();
  fn(seed, first, stream, purpose, u, count);
}

bool philox_uniforms_isa(PhiloxIsa isa, uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u,
                         int64_t count) {
  if (isa == kPhiloxAuto) {
    philox_uniforms(seed, first, stream, purpose, u, count);
    return true;
  }
  if (!supported(isa)) return false;
  path(isa)(seed, first, stream, purpose, u, count);
  return true;
}

}  // namespace cpu
}  // namespace pyfuse
