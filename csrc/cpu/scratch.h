// Per-thread scratch memory that outlives a call. A kernel's large scratch (the ensemble's rows of
// exponentials: 1.1 MB per thread for 151936 + 128256 ids) allocated per call costs page faults and zeroing
// on every call, and in 4 KiB pages its random reads (gathers) miss the TLB. This one is kept per calling
// thread and slot, grown when a call needs more, 2 MiB-aligned and advised for transparent huge pages.
// Contents are undefined: callers write before they read.
#pragma once

#include <stddef.h>

namespace pyfuse {
namespace cpu {

// `count` floats of the calling thread's scratch slot `slot` (< kScratchSlots); valid until the next call with
// the same slot on this thread. Two slots let one call hold two buffers.
constexpr int kScratchSlots = 2;
float* scratch_floats(int slot, size_t count);

}  // namespace cpu
}  // namespace pyfuse
