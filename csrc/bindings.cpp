// fastppo._C: the compiled core, one pybind11 module over raw buffers. Each op family registers
// itself from its bindings_<family>.cpp; what they share is in bindings_common.h.
#include "bindings_common.h"
#include "fastppo_build_config.h"
#include "parallel.h"

#if FASTPPO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastppo {
const char* cpu_isa();           // cpu_kernels.cpp: the instruction set the CPU loops run with
const char* cpu_isa_compiled();  // and the copies compiled, comma-separated
}  // namespace fastppo

namespace {

namespace py = pybind11;

int cuda_device_count() {
#if FASTPPO_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error and report none
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTPPO_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  // The CPU loops' threads (parallel.h): "openmp" (with the OpenMP runtime library the module's
  // calls resolved to), fastppo's own "pool", or "none"; and how many a parallel loop runs on now.
  const std::string runtime = fastppo::thread_runtime();
  info["thread_runtime"] = runtime;
  info["thread_runtime_library"] = runtime == "openmp" ? py::object(py::str(fastppo::thread_runtime_library()))
                                                       : py::object(py::none());
  info["threads"] = fastppo::parallel_threads();
#if defined(_OPENMP) && !FASTPPO_THREAD_POOL
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
#endif
  info["cpu_isa"] = fastppo::cpu_isa();
  info["cpu_isa_compiled"] = fastppo::cpu_isa_compiled();
  info["cuda"] = static_cast<bool>(FASTPPO_WITH_CUDA);
  info["cuda_architectures"] = FASTPPO_CUDA_ARCHS;
#if FASTPPO_WITH_CUDA
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda_runtime_version"] = py::none();
#endif
  // What the build could not do and did without (no OpenMP, CUDA architectures dropped, CUDA
  // skipped because nvcc failed), one message each; empty when everything asked for was built.
  py::list warnings;
  for (const char* w : {FASTPPO_BUILD_WARNINGS})
    if (*w) warnings.append(w);
  info["build_warnings"] = warnings;
  info["sanitizers"] = FASTPPO_SANITIZERS;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  fastppo::cpu_isa();  // an unknown FASTPPO_CPU_ISA fails the import, naming the value
  fastppo::requested_threads();  // and so does a FASTPPO_NUM_THREADS that is not a thread count
  m.doc() = "fastppo compiled kernels over raw buffers (see fastppo for the public API)";
  m.attr("__version__") = FASTPPO_VERSION;
  m.attr("WITH_CUDA") = static_cast<bool>(FASTPPO_WITH_CUDA);
  m.def("build_info", &build_info, "Dict describing how this module was compiled.");
  m.def("cuda_device_count", &cuda_device_count,
        "Number of CUDA devices the compiled runtime sees (0 on a CPU-only build or without a driver).");
  fastppo::bind::bind_gae(m);
  fastppo::bind::bind_loss(m);
  fastppo::bind::bind_heads(m);
  fastppo::bind::bind_rlhf(m);
  fastppo::bind::bind_env_step(m);
  fastppo::bind::bind_actor_critic(m);
  fastppo::bind::bind_rnn(m);
}
