// Runtime dispatch for the auto-vectorised CPU loops: one build, the widest vectors the CPU has (never
// -march=native). x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) rather than plain avx512f: without VL, GCC's avx512f
// clone falls back to 16 ymm registers and AVX2-style unsigned compares, which spilled in prune's write pass.
#pragma once

#define PYFUSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define PYFUSE_INLINE __attribute__((always_inline)) inline
