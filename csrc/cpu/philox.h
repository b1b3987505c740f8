#pragma once

#include <stdint.h>

namespace pyfuse {
namespace cpu {

void rand_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t stream);

}  // namespace cpu
}  // namespace pyfuse
