#pragma once

#include <stdint.h>

#include "cpu/philox_lanes.h"

namespace pyfuse {
namespace cpu {

// out[i] = Philox uniform of element offset + i of (stream, purpose 0) in the given layout, on the given vector
// path; false (out untouched) when this CPU cannot run that path.
bool rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream, PhiloxIsa isa = kPhiloxAuto,
                  PhiloxLayout layout = kPhiloxFirstWord);

}  // namespace cpu
}  // namespace pyfuse
