// fastppo._C: the compiled core, one pybind11 module over raw buffers. Each op family registers
// itself from its bindings_<family>.cpp; what they share is in bindings_common.h.
#include <omp.h>

#include "bindings_common.h"

#if FASTPPO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastppo {
const char* cpu_isa();  // cpu_kernels.cpp: the instruction set the CPU loops run with
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
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
  info["openmp_max_threads"] = omp_get_max_threads();
  info["cpu_isa"] = fastppo::cpu_isa();
  info["cuda"] = static_cast<bool>(FASTPPO_WITH_CUDA);
  info["cuda_architectures"] = FASTPPO_CUDA_ARCHS;
#if FASTPPO_WITH_CUDA
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda_runtime_version"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  fastppo::cpu_isa();  // an unknown FASTPPO_CPU_ISA fails the import, naming the value
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
  fastppo::bind::bind_mlp(m);
}
