// The one block-wide reduction of the CUDA kernels: a fixed-shape tree in shared memory, so the
// result is the same bits every run (no atomics whose order varies).
#pragma once

#include "fastppo_math.h"

namespace fastppo {

// Combines every thread's value with `op` (blockDim.x == kThreads, a power of two) and returns the
// total to every thread. Every thread of the block must call it; `shared` holds kThreads values.
template <int kThreads, typename T, typename Op>
__device__ T block_reduce(T value, T* shared, Op op) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  return shared[0];
}

// The combining rules the kernels reduce with.
struct MergeMoments {
  __device__ Moments operator()(Moments a, Moments b) const { return moments_merge(a, b); }
};
struct MergeSoftmax {
  template <typename S>
  __device__ SoftmaxState<S> operator()(SoftmaxState<S> a, SoftmaxState<S> b) const { return softmax_merge(a, b); }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return b > a ? b : a; }
};
// Element-wise sum of fixed-size arrays of doubles.
template <int kN>
struct Sums {
  double v[kN];
};
struct AddSums {
  template <int kN>
  __device__ Sums<kN> operator()(Sums<kN> a, const Sums<kN>& b) const {
    for (int i = 0; i < kN; ++i) a.v[i] += b.v[i];
    return a;
  }
};

}  // namespace fastppo
