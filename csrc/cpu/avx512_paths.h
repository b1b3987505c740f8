// One switch for the kernels written with AVX-512 intrinsics (prune and merge band sweeps, the ensemble
// exponential sums): they run when the CPU has AVX-512 F, BW, VL and DQ and the tests have not turned them
// off, so that an AVX-512 machine checks the portable paths against them too.
#pragma once

namespace pyfuse {
namespace cpu {

bool avx512_paths_usable();
// Turns the AVX-512 paths on or off (off: the portable ones); returns the previous setting.
bool set_avx512_paths(bool enabled);

}  // namespace cpu
}  // namespace pyfuse
