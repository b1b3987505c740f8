#include "cpu/scratch.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace pyfuse {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  ~Buffer() { std::free(data); }
};

thread_local Buffer t_buffers[kScratchSlots];

}  // namespace

float* scratch_floats(int slot, size_t count) {
  Buffer& b = t_buffers[slot];
  const size_t need = count * sizeof(float);
  if (need > b.bytes) {
    const size_t bytes = (need + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, bytes);
    if (p == nullptr) throw std::bad_alloc();
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the buffer still works, in small pages
    std::free(b.data);
    b.data = p;
    b.bytes = bytes;
  }
  return static_cast<float*>(b.data);
}

}  // namespace cpu
}  // namespace pyfuse
