// The fused PPO loss on CUDA: one block per chunk, a fixed-shape tree reduction in shared memory
// (no atomics, so the same bits every run), and one-thread finish kernels that run the same
// loss_pass1_finish / ppo_loss_finish as the CPU. The per-element math is in ppo_loss.h / fastppo_math.h.
#include <cuda_runtime.h>


#include "cuda_launch.h"
#include "cuda_reduce.cuh"
#include "ppo_loss.h"

namespace fastppo {
namespace {

constexpr int kThreads = 256;

template <typename S>
__global__ void adv_moments_kernel(PpoLossArgs a) {
  __shared__ Moments shared[kThreads];
  __shared__ Sums<1> shared_logratio[kThreads];
  const ChunkRange range = chunk_range(a, blockIdx.x);
  Moments m{0.0, 0.0, 0.0};
  Sums<1> logratio = {};
  for (int64_t c = range.c0 + threadIdx.x; c < range.c1; c += blockDim.x) {
    m = adv_moments_element<S>(a, range.r, c, m);
    if (a.sequence_ratio) logratio.v[0] += selected_logratio<S>(a, range.r, c);
  }
  const Moments total = block_reduce<kThreads>(m, shared, MergeMoments{});
  const Sums<1> logratio_total =
      a.sequence_ratio ? block_reduce<kThreads>(logratio, shared_logratio, AddSums{}) : Sums<1>{};
  if (threadIdx.x == 0) adv_moments_store(a, blockIdx.x, total, logratio_total.v[0]);
}

template <typename S>
__global__ void loss_pass1_finish_kernel(PpoLossArgs a) { loss_pass1_finish<S>(a); }

template <typename S>
__global__ void ppo_loss_kernel(PpoLossArgs a) {
  __shared__ Sums<kLossSums> shared[kThreads];
  const ChunkRange range = chunk_range(a, blockIdx.x);
  Sums<kLossSums> sums = {};
  for (int64_t c = range.c0 + threadIdx.x; c < range.c1; c += blockDim.x) ppo_loss_element<S>(a, range.r, c, sums.v);
  const Sums<kLossSums> total = block_reduce<kThreads>(sums, shared, AddSums{});
  if (threadIdx.x < kLossSums) a.partials[blockIdx.x * kLossSums + threadIdx.x] = total.v[threadIdx.x];
}

template <typename S>
__global__ void ppo_loss_finish_kernel(PpoLossArgs a) { ppo_loss_finish<S>(a); }

template <typename S>
__global__ void sequence_grad_kernel(PpoLossArgs a) {
  const ChunkRange range = chunk_range(a, blockIdx.x);
  for (int64_t c = range.c0 + threadIdx.x; c < range.c1; c += blockDim.x) sequence_grad_element<S>(a, range.r, c);
}

template <typename S>
void launch(const PpoLossArgs& a, cudaStream_t stream) {
  const auto chunks = static_cast<unsigned>(a.chunks());
  if (chunks > 0 && a.needs_pass1()) adv_moments_kernel<S><<<chunks, kThreads, 0, stream>>>(a);
  loss_pass1_finish_kernel<S><<<1, 1, 0, stream>>>(a);
  if (chunks > 0) ppo_loss_kernel<S><<<chunks, kThreads, 0, stream>>>(a);
  ppo_loss_finish_kernel<S><<<1, 1, 0, stream>>>(a);
  if (chunks > 0 && a.sequence_ratio) sequence_grad_kernel<S><<<chunks, kThreads, 0, stream>>>(a);
}

}  // namespace

void ppo_loss_cuda(const PpoLossArgs& args, int device, std::uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.ppo_loss", [&] { args.is_f64 ? launch<double>(args, stream) : launch<float>(args, stream); });
}

}  // namespace fastppo
