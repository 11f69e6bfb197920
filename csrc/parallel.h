// How the CPU loops run on several threads. The build picks the runtime (CMake's FASTPPO_THREADS):
// `openmp`, the compiler's OpenMP runtime, or `pool`, fastppo's own threads (thread_pool.h); a
// build without either runs every loop on the calling thread. The loops call only the two helpers
// below, so each runtime splits a loop into the same contiguous blocks and a kernel's results do
// not depend on the runtime. `#pragma omp simd` is not a thread: it vectorizes under every runtime
// (the pool build compiles with -fopenmp-simd).
#pragma once

#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTPPO_HAS_MXCSR 1
#endif

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

// The calling thread's floating-point mode (x86: MXCSR, whose flush-to-zero and denormals-are-zero
// bits a kernel may set for its call, see FlushDenormals) taken by each thread of a
// parallel region while it runs its part, so a result does not depend on which thread computed it.
struct FpMode {
#if FASTPPO_HAS_MXCSR
  unsigned int csr = _mm_getcsr();
#endif
};
struct FpModeScope {
#if FASTPPO_HAS_MXCSR
  unsigned int saved;
  explicit FpModeScope(const FpMode& mode) : saved(_mm_getcsr()) {
    if (saved != mode.csr) _mm_setcsr(mode.csr);
  }
  ~FpModeScope() {
    if (_mm_getcsr() != saved) _mm_setcsr(saved);
  }
#else
  explicit FpModeScope(const FpMode&) {}
#endif
};

// While alive, subnormal numbers are flushed to zero and read as zero on this thread (x86: MXCSR's
// FTZ and DAZ bits; parallel regions pass the mode to their threads, below), restored after. An
// instruction that makes or reads a subnormal float takes a microcode assist of about a hundred
// cycles: Adam's first moment of a parameter whose gradient stays 0 (a dead ReLU unit) decays by
// beta1 each step through the subnormals, which cost the fused actor-critic's apply step several
// times its arithmetic. What is flushed is below 1.2e-38 (float32) or 2.2e-308 (float64), as under
// torch.set_flush_denormal(True).
struct FlushDenormals {
#if FASTPPO_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#if FASTPPO_THREAD_POOL
template <typename Fn>
void call_part(void* fn, int part, int parts) {
  (*static_cast<const Fn*>(fn))(part, parts);
}
#endif

// Calls fn(part, parts) once for each part in [0, parts), each on its own thread, when `parallel`
// holds (parts = parallel_threads(), or 1 when the call is nested in another parallel call), else
// fn(0, 1) on the calling thread. What fn computes must not depend on `parts`.
// Every part runs in the calling thread's floating-point mode (FpMode).
template <typename Fn>
void parallel_parts(bool parallel, const Fn& fn) {
  if (parallel) {
    const FpMode mode;
    auto part_in_mode = [&](int part, int parts) {
      const FpModeScope scope(mode);
      fn(part, parts);
    };
#if FASTPPO_THREAD_POOL
    using Part = decltype(part_in_mode);
    pool::run(&call_part<Part>, const_cast<void*>(static_cast<const void*>(&part_in_mode)));
    return;
#elif defined(_OPENMP)
    const int threads = parallel_threads();
#pragma omp parallel num_threads(threads)
    part_in_mode(omp_get_thread_num(), omp_get_num_threads());
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
