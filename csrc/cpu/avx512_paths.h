// One switch for the kernels written with AVX-512 intrinsics (prune and merge band sweeps, the ensemble
// exponential sums): they run when the CPU has AVX-512 F, BW, VL and DQ and the tests have not turned them
// off, so that an AVX-512 machine checks the portable paths against them too.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "pyfuse/common.h"

namespace pyfuse {
namespace cpu {

bool avx512_paths_usable();
// Turns the AVX-512 paths on or off (off: the portable ones); returns the previous setting.
bool set_avx512_paths(bool enabled);

// The target of every AVX-512 path: call these only from code compiled for it, when avx512_paths_usable().
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// 16 elements of a float32 / float16 / bfloat16 array from element i, widened to float32 (exact).
template <int32_t kDtype>
inline __m512 load16(const void* p, int64_t i) {
  if constexpr (kDtype == kFloat32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (kDtype == kFloat16) return _mm512_cvtph_ps(h);  // exact, like fp16_to_float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#pragma GCC pop_options

}  // namespace cpu
}  // namespace pyfuse
