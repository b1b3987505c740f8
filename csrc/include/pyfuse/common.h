// Torch-free definitions shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PYFUSE_HD __host__ __device__ __forceinline__
#else
#define PYFUSE_HD inline
#endif

namespace pyfuse {

// Must match pyfuse._ext.DTYPE_CODES.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

PYFUSE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

PYFUSE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// bfloat16 is the top half of a float32.
PYFUSE_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
// Written without a branch, so that loops of it vectorize.
PYFUSE_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Exact. Written without branches (every case computed, one selected), so that loops of it vectorize.
PYFUSE_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const uint32_t inf_nan = sign | 0x7f800000u | (mant << 13);
  // Zero and subnormal halves: mant * 2^-24, exact in float32.
  const uint32_t small = sign | float_bits(static_cast<float>(static_cast<int32_t>(mant)) * 5.9604644775390625e-08f);
  // Bit-mask selects, not ?:, so that GCC cannot sink the float multiply into a branch (-ftrapping-math
  // would then keep the branch and the loop scalar).
  const uint32_t is_inf_nan = 0u - static_cast<uint32_t>(exp == 0x1fu), is_small = 0u - static_cast<uint32_t>(exp == 0);
  return bits_float((inf_nan & is_inf_nan) | (small & is_small) | (normal & ~(is_inf_nan | is_small)));
}

// Round to nearest even, overflow to inf, NaN kept (as sign | 0x7e00). Branch-free like fp16_to_float.
PYFUSE_HD uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
  // Below 2^-14 (subnormal half or zero): round |f| * 2^24 to an integer, to nearest even, by adding 2^23 in
  // float32 (exact product; the sum rounds at the unit). Rounding up to 2^10 gives the smallest normal half.
  const uint32_t small = sign | (float_bits(bits_float(a) * 16777216.0f + 8388608.0f) - 0x4b000000u);
  const uint32_t is_small = 0u - static_cast<uint32_t>(a < 0x38800000u);
  const uint32_t is_inf = 0u - static_cast<uint32_t>(a >= 0x477ff000u);  // rounds to >= 65520: inf
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7f800000u);
  uint32_t half = (small & is_small) | (normal & ~is_small);  // bit-mask selects, as in fp16_to_float
  half = ((sign | 0x7c00u) & is_inf) | (half & ~is_inf);
  half = ((sign | 0x7e00u) & is_nan) | (half & ~is_nan);
  return static_cast<uint16_t>(half);
}

PYFUSE_HD float load_float(const void* p, int32_t dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kFloat16 ? fp16_to_float(h) : bf16_to_float(h);
}

PYFUSE_HD void store_float(void* p, int32_t dtype, int64_t i, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dtype == kFloat16 ? float_to_fp16(v) : float_to_bf16(v);
  }
}

PYFUSE_HD int64_t dtype_size(int32_t dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace pyfuse
