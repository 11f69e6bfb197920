// The RLHF kernels on CUDA: the per-element math is in rlhf.h / fastppo_math.h, shared with the CPU.
//   kl_rewards:    one block per row; each thread writes its tokens and the block takes the max of
//                  the selected indices (a tree in shared memory), then one thread adds the score.
//   masked_whiten: one block per chunk for the moments (a fixed-shape tree: the same bits every
//                  run), one thread merges them in chunk order, then one thread per element.
//   token_gae:     one thread per row.
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "cuda_reduce.cuh"
#include "rlhf.h"

namespace fastppo {
namespace {

constexpr int kThreads = 256;

template <typename S>
__global__ void kl_rewards_kernel(KlRewardArgs a) {
  __shared__ int64_t last[kThreads];
  const int64_t r = blockIdx.x;
  int64_t mine = -1;
  for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x)
    if (kl_reward_element<S>(a, r, c)) mine = c;
  // The reduction's barriers also make this block's writes to rewards visible to thread 0.
  const int64_t row_last = block_reduce<kThreads>(mine, last, Max{});
  if (threadIdx.x == 0) kl_reward_finish_row<S>(a, r, row_last);
}

template <typename S>
__global__ void whiten_moments_kernel(WhitenArgs a) {
  __shared__ Moments shared[kThreads];
  const int64_t k = blockIdx.x, r = a.chunk_row(k), c1 = a.chunk_end(k);
  Moments m{0.0, 0.0, 0.0};
  for (int64_t c = a.chunk_begin(k) + threadIdx.x; c < c1; c += blockDim.x) m = whiten_moments_element<S>(a, r, c, m);
  const Moments total = block_reduce<kThreads>(m, shared, MergeMoments{});
  if (threadIdx.x == 0) whiten_store(a, k, total);
}

__global__ void whiten_finish_kernel(WhitenArgs a) { whiten_finish(a); }

template <typename S>
__global__ void whiten_apply_kernel(WhitenArgs a) {
  const int64_t n = a.R * a.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    whiten_element<S>(a, i / a.C, i % a.C);
}

// One thread per row: each row is a backward recurrence.
template <typename S>
__global__ void token_gae_kernel(TokenGaeArgs a) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < a.R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    token_gae_row<S>(a, r);
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename S>
void launch_kl_rewards(const KlRewardArgs& a, cudaStream_t stream) {
  if (a.R > 0) kl_rewards_kernel<S><<<static_cast<unsigned>(a.R), kThreads, 0, stream>>>(a);
}

template <typename S>
void launch_whiten(const WhitenArgs& a, cudaStream_t stream) {
  const auto chunks = static_cast<unsigned>(a.chunks());
  if (chunks > 0) whiten_moments_kernel<S><<<chunks, kThreads, 0, stream>>>(a);
  whiten_finish_kernel<<<1, 1, 0, stream>>>(a);
  if (a.R * a.C > 0) whiten_apply_kernel<S><<<grid_for(a.R * a.C), kThreads, 0, stream>>>(a);
}

template <typename S>
void launch_token_gae(const TokenGaeArgs& a, cudaStream_t stream) {
  if (a.R > 0 && a.C > 0) token_gae_kernel<S><<<grid_for(a.R), kThreads, 0, stream>>>(a);
}

}  // namespace

void kl_rewards_cuda(const KlRewardArgs& args, int device, std::uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.rlhf.kl_rewards", [&] {
    args.is_f64 ? launch_kl_rewards<double>(args, stream) : launch_kl_rewards<float>(args, stream);
  });
}

void masked_whiten_cuda(const WhitenArgs& args, int device, std::uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.rlhf.masked_whiten", [&] {
    args.is_f64 ? launch_whiten<double>(args, stream) : launch_whiten<float>(args, stream);
  });
}

}  // namespace fastppo

namespace fastppo {

void token_gae_cuda(const TokenGaeArgs& args, int device, std::uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.rlhf.token_gae", [&] {
    args.is_f64 ? launch_token_gae<double>(args, stream) : launch_token_gae<float>(args, stream);
  });
}

}  // namespace fastppo
