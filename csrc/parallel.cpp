// The thread count and the runtime's name for parallel.h, under each thread runtime.
#include "parallel.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#if !FASTPPO_THREAD_POOL && defined(_OPENMP)
#include <dlfcn.h>
#endif

namespace fastppo {

int requested_threads() {
  static const int n = [] {
    const char* s = std::getenv("FASTPPO_NUM_THREADS");
    if (s == nullptr || *s == '\0') return 0;
    char* end = nullptr;
    const long value = std::strtol(s, &end, 10);
    if (*end != '\0' || value < 1 || value > 4096)
      throw std::invalid_argument("FASTPPO_NUM_THREADS must be an integer from 1 to 4096 (or unset), got '" +
                                  std::string(s) + "'");
    return static_cast<int>(value);
  }();
  return n;
}

int parallel_threads() {
#if FASTPPO_THREAD_POOL
  return pool::threads();
#elif defined(_OPENMP)
  const int n = requested_threads();
  return n > 0 ? n : omp_get_max_threads();  // read at each call: torch.set_num_threads may change it
#else
  return 1;
#endif
}

const char* thread_runtime() {
#if FASTPPO_THREAD_POOL
  return "pool";
#elif defined(_OPENMP)
  return "openmp";
#else
  return "none";
#endif
}

const char* thread_runtime_library() {
#if !FASTPPO_THREAD_POOL && defined(_OPENMP)
  // The library that defines the OpenMP entry point this module calls: whichever libgomp.so.1 the
  // process loaded first (the system's, or torch's bundled copy of the same name), or a renamed copy
  // shipped beside the module.
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) != 0 && info.dli_fname != nullptr)
    return info.dli_fname;
#endif
  return "";
}

}  // namespace fastppo
