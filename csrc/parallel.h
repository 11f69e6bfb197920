// How the CPU loops run on several threads. The build picks the runtime (CMake's FASTPPO_THREADS):
// `openmp`, the compiler's OpenMP runtime, or `pool`, fastppo's own threads (thread_pool.h); a
// build without either runs every loop on the calling thread. The loops call only the two helpers
// below, so each runtime splits a loop into the same contiguous blocks and a kernel's results do
// not depend on the runtime. `#pragma omp simd` is not a thread: it vectorizes under every runtime
// (the pool build compiles with -fopenmp-simd).
#pragma once

#include <cstdint>

#if FASTPPO_THREAD_POOL
#include "thread_pool.h"
#elif defined(_OPENMP)
#include <omp.h>
#endif

namespace fastppo {

// The threads a parallel loop runs on: FASTPPO_NUM_THREADS when set; otherwise, under OpenMP,
// the runtime's own count (OMP_NUM_THREADS, or torch.set_num_threads when torch's runtime is the
// one loaded), and for the pool OMP_NUM_THREADS or the CPUs this process may run on.
int parallel_threads();

// FASTPPO_NUM_THREADS as a count, 0 when unset; any other value than an integer in [1, 4096]
// throws std::invalid_argument naming the variable and the value.
int requested_threads();

// The runtime this build runs its loops on: "openmp", "pool" or "none"; and, under OpenMP, the
// file of the runtime library the module's OpenMP calls resolved to (empty otherwise).
const char* thread_runtime();
const char* thread_runtime_library();

// Block `part` of `parts` contiguous blocks over [begin, end), as `schedule(static)` cuts a loop:
// sizes differ by at most one, the longer blocks first.
inline void static_block(int64_t begin, int64_t end, int part, int parts, int64_t* lo, int64_t* hi) {
  const int64_t n = end - begin, q = n / parts, r = n % parts;
  *lo = begin + part * q + (part < r ? part : r);
  *hi = *lo + q + (part < r ? 1 : 0);
}

#if FASTPPO_THREAD_POOL
template <typename Fn>
void call_part(void* fn, int part, int parts) {
  (*static_cast<const Fn*>(fn))(part, parts);
}
#endif

// Calls fn(part, parts) once for each part in [0, parts), each on its own thread, when `parallel`
// holds (parts = parallel_threads(), or 1 when the call is nested in another parallel call), else
// fn(0, 1) on the calling thread. What fn computes must not depend on `parts`.
template <typename Fn>
void parallel_parts(bool parallel, const Fn& fn) {
  if (parallel) {
#if FASTPPO_THREAD_POOL
    pool::run(&call_part<Fn>, const_cast<void*>(static_cast<const void*>(&fn)));
    return;
#elif defined(_OPENMP)
    const int threads = parallel_threads();
#pragma omp parallel num_threads(threads)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
#endif
  }
  fn(0, 1);
}

// `#pragma omp parallel for schedule(static) if (parallel)` over [begin, end): fn(lo, hi) for each
// non-empty block of the static schedule, one block per thread.
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, bool parallel, const Fn& fn) {
  if (end <= begin) return;
  parallel_parts(parallel && end - begin > 1, [&](int part, int parts) {
    int64_t lo, hi;
    static_block(begin, end, part, parts, &lo, &hi);
    if (lo < hi) fn(lo, hi);
  });
}

}  // namespace fastppo
