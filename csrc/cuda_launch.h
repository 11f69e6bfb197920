// Launch plumbing shared by the CUDA kernels: error checks and running on the caller's device.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastppo {

inline void cuda_check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
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
