// A small kernel over fastppo's CUDA headers: CMakeLists.txt builds it for the chosen architectures
// before the real kernels, and leaves out those (or CUDA altogether) that this nvcc cannot build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_launch.h"
#include "cuda_reduce.cuh"

namespace {
constexpr int kThreads = 128;

__global__ void probe_kernel(const double* x, int64_t n, double* out) {
  __shared__ fastppo::Moments shared[kThreads];
  fastppo::Moments m{};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) m = fastppo::moments_merge(m, fastppo::Moments{1.0, x[i], 0.0});
  m = fastppo::block_reduce<kThreads>(m, shared, fastppo::MergeMoments{});
  // the half-precision conversions the heads use
  if (threadIdx.x == 0) *out = __bfloat162float(__float2bfloat16(float(m.mean))) + __half2float(__float2half(1.0f));
}
}  // namespace

int main() {
  probe_kernel<<<1, kThreads>>>(nullptr, 0, nullptr);
  return 0;
}
