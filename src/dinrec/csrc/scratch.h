// Per-thread scratch buffers for the dinrec CPU kernels.
//
// scratch<T, Tag>(n): a buffer of at least n elements of T, reused from call to call (fresh
// multi-MB buffers per call cost page faults), 64-byte aligned (a cache line, one AVX-512
// vector: std::vector's 16-byte alignment made the vector loads and the BLAS calls
// measurably slower). One buffer per (type, tag) and thread; a kernel uses different tags
// for buffers it needs at the same time. Valid until the next call with the same (T, Tag)
// on this thread.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace dinrec {

template <typename T, int Tag = 0>
T* scratch(int64_t n) {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<T[], Free> buf;
  thread_local int64_t size = 0;
  if (size < n) {
    const int64_t bytes = (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "dinrec: out of memory for a scratch buffer of ", bytes, " bytes");
    buf.reset(p);
    size = n;
  }
  return buf.get();
}

}  // namespace dinrec
