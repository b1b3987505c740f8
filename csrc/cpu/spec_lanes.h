// 16-lane float32 blocks for the CPU row loops of the spec family (validation, softmax statistics).
// GCC vector types give one zmm, two ymm or four xmm registers depending on the target_clones pick, with
// the same lane-wise arithmetic, hence the same results, on each.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "pyfuse/common.h"

// The vector types cross no call boundary (always_inline); the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyfuse {
namespace cpu {
namespace lanes {

constexpr int kLanes = 16;
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

// Element type of a dtype code.
template <int DT>
using Elem = typename std::conditional<DT == kFloat32, float, uint16_t>::type;

// 16 elements from p[j..j+16), widened exactly to float32 (inline: vector types do not cross calls
// cheaply). float16 subnormals are scaled as integers: a float32 subnormal operand would take the slow
// microcode path.
template <int DT>
__attribute__((always_inline)) inline F16 widen(const void* p, int64_t j) {
  if (DT == kFloat32) {
    F16 v;
    __builtin_memcpy(&v, static_cast<const float*>(p) + j, sizeof v);
    return v;
  }
  H16 raw;
  __builtin_memcpy(&raw, static_cast<const uint16_t*>(p) + j, sizeof raw);
  const U16 h = __builtin_convertvector(raw, U16);
  if (DT == kBFloat16) return reinterpret_cast<F16>(h << 16);
  const U16 em = h & 0x7fffu;
  const U16 normal = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : (em << 13) + 0x38000000u;
  const F16 sub = __builtin_convertvector(reinterpret_cast<I16>(em), F16) * 0x1p-24f;
  const U16 mag = em < 0x400u ? reinterpret_cast<U16>(sub) : normal;
  return reinterpret_cast<F16>(mag | ((h & 0x8000u) << 16));
}

// Calls body(v, k) for each block of 16 elements of a row of n, k of them valid (the tail block is
// zero-filled after k).
template <int DT, class Body>
__attribute__((always_inline)) inline void for_blocks(const void* p, int64_t n, const Body& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) body(widen<DT>(p, j), kLanes);
  if (j < n) {
    Elem<DT> tail[kLanes] = {};
    for (int64_t i = j; i < n; ++i) tail[i - j] = static_cast<const Elem<DT>*>(p)[i];
    body(widen<DT>(tail, 0), static_cast<int>(n - j));
  }
}

constexpr I16 kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Sum of the lanes, combined pairwise (a fixed order).
__attribute__((always_inline)) inline float sum(const F16& v) {
  F16 s = v;
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

__attribute__((always_inline)) inline float max(const F16& m) {
  float hi = m[0];
  for (int l = 1; l < kLanes; ++l) hi = m[l] > hi ? m[l] : hi;
  return hi;
}

}  // namespace lanes
}  // namespace cpu
}  // namespace pyfuse
