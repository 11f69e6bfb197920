// Launch plumbing shared by the CUDA kernels: error checks and running on the caller's device.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastppo {

inline void cuda_check(cudaError_t err, const char* op, const char* what) {
  if (err == cudaSuccess) return;
  std::string message = std::string(op) + ": " + what + ": " + cudaGetErrorString(err);
  // The runtime is linked into the module and the driver opened at run time: with no driver, or
  // one older than the runtime, the runtime says "insufficient driver" and every call fails.
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
    message += " (this build of fastppo runs CUDA ops with the CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
               std::to_string(CUDART_VERSION % 1000 / 10) +
               " runtime, which needs an NVIDIA driver for that CUDA version or newer, and a GPU: this machine "
               "lacks one or the other, so fastppo.cuda_available() is False; pass CPU arrays or tensors)";
  throw std::runtime_error(message);
}

// Runs `launch` (which enqueues kernels) with `device` current, restores the caller's current
// device, and turns a launch error into an exception naming `op`.
template <typename Launch>
void on_device(int device, const char* op, Launch launch) {
  int previous = 0;
  cuda_check(cudaGetDevice(&previous), op, "cudaGetDevice");
  if (previous != device) cuda_check(cudaSetDevice(device), op, "cudaSetDevice");
  launch();
  const cudaError_t launched = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  cuda_check(launched, op, "kernel launch");
}

}  // namespace fastppo
