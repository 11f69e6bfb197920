// OpenMP is optional: without it (a compiler with no OpenMP runtime, or -DFASTPPO_ENABLE_OPENMP=OFF)
// the CPU loops run on the calling thread, `#pragma omp simd` still vectorizes where the compiler
// takes -fopenmp-simd, and these stand-ins answer the runtime's questions for one thread.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#else
static inline int omp_get_max_threads() { return 1; }
static inline int omp_get_num_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
#endif
