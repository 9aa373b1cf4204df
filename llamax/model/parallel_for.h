// ParallelFor for llamax's CPU kernels (llamax/model/*.cc, built by `llamax.model.cpu_kernels`).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llamax {

// Runs body(0) ... body(count - 1) on the caller and up to threads - 1 of XLA's pool threads.
// Every thread (the caller included) takes indices until none is left, so the caller never waits
// on a task the pool has not started; a task that starts after the last index was taken returns
// at once (it holds the shared counters, not the caller's buffers).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t threads, int64_t count, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t count;
    Body body;
    Shared(int64_t count, Body body) : count(count), body(body) {}
    void Work() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(count, body);
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// Every thread XLA's pool has (at least one: the caller).
inline int64_t AllThreads(xla::ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

}  // namespace llamax
