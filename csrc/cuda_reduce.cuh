// Block-wide reductions shared by the CUDA kernels: a fixed-shape tree in shared memory, so the
// result is the same bits every run (no atomics whose order varies).
#pragma once

#include "fastppo_math.h"

namespace fastppo {

// Merges every thread's moments (blockDim.x == kThreads, a power of two); the total lands in
// shared[0]. Every thread of the block must call it.
template <int kThreads>
__device__ void block_merge_moments(Moments m, Moments* shared) {
  shared[threadIdx.x] = m;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = moments_merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
}

}  // namespace fastppo
