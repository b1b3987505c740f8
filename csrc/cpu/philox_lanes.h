// Philox uniforms for a run of consecutive counters on the CPU, at the widest vector width the CPU has
// (AVX-512, AVX2 or scalar, chosen once at run time: one build, never -march=native).
// Bit-identical to pyfuse::philox::uniform (csrc/include/pyfuse/philox.h) on every path.
#pragma once

#include <stdint.h>

namespace pyfuse {
namespace cpu {

// Vector paths, widest first; kPhiloxAuto picks the widest this CPU supports.
enum PhiloxIsa : int32_t { kPhiloxAuto = 0, kPhiloxAvx512 = 1, kPhiloxAvx2 = 2, kPhiloxScalar = 3 };

// u[l] = uniform of counter (first + l, stream, purpose) for 0 <= l < count. Out of line on purpose:
// the kernels call it once per block of a few hundred or thousand elements.
void philox_uniforms(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count);

// Whether this CPU can run a path (kPhiloxAuto and kPhiloxScalar always).
bool philox_isa_usable(PhiloxIsa isa);

// philox_uniforms on a named path, for the tests of every path. Requires philox_isa_usable(isa).
void philox_uniforms_isa(PhiloxIsa isa, uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u,
                         int64_t count);

}  // namespace cpu
}  // namespace pyfuse
