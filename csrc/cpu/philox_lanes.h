// Philox uniforms for a run of consecutive counters on the CPU, at the widest vector width the CPU has
// (AVX-512, AVX2 or scalar, chosen once at run time: one build, never -march=native).
// Bit-identical to pyfuse::philox::uniform / packed_uniform (csrc/include/pyfuse/philox.h) on every path.
#pragma once

#include <stdint.h>

namespace pyfuse {
namespace cpu {

// Vector paths, widest first; kPhiloxAuto picks the widest this CPU supports.
enum PhiloxIsa : int32_t { kPhiloxAuto = 0, kPhiloxAvx512 = 1, kPhiloxAvx2 = 2, kPhiloxScalar = 3 };

// Which Philox word an element takes (csrc/include/pyfuse/philox.h): kPhiloxFirstWord = philox::uniform
// (element e: word 0 of counter e, tl.rand), kPhiloxPacked = philox::packed_uniform (element e: word e % 4 of
// counter e / 4, tl.rand4x: a quarter of the rounds).
enum PhiloxLayout : int32_t { kPhiloxFirstWord = 0, kPhiloxPacked = 1 };

// u[l] = uniform of element first + l of (stream, purpose) for 0 <= l < count (packed: first + count <= 2^64,
// the run does not wrap). Out of line on purpose:
// the kernels call it once per block of a few hundred or thousand elements.
void philox_uniforms(uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u, int64_t count,
                     PhiloxLayout layout = kPhiloxFirstWord);

// Whether this CPU can run a path (kPhiloxAuto and kPhiloxScalar always).
bool philox_isa_usable(PhiloxIsa isa);

// philox_uniforms on a named path, for the tests of every path. Requires philox_isa_usable(isa).
void philox_uniforms_isa(PhiloxIsa isa, uint64_t seed, uint64_t first, uint32_t stream, uint32_t purpose, float* u,
                         int64_t count, PhiloxLayout layout = kPhiloxFirstWord);

}  // namespace cpu
}  // namespace pyfuse
