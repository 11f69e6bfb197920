// GAE on CUDA. The per-step math is in fastppo_math.h, shared with the CPU path; these kernels
// only decide which thread walks which steps.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_launch.h"
#include "gae.h"

namespace fastppo {
namespace {

constexpr int kColumnThreads = 256;
constexpr int kMaxSplitThreads = 256;
// Rows below which one thread per row would leave most of the GPU idle.
constexpr int64_t kSplitRowsBelow = 1024;
// Horizons below this are short enough for one thread per row.
constexpr int64_t kSplitHorizonFrom = 128;
// Steps each thread of the split kernel walks at the least.
constexpr int64_t kMinStepsPerThread = 8;

// Many rows: one thread per environment walks its whole horizon. Time-major memory makes the
// loads of a warp adjacent.
template <typename S>
__global__ void gae_column_kernel(GaeArgs a) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.N) return;
  gae_chunk_write(gae_row<S>(a, n), 0, a.T, S(a.gamma), S(a.gamma * a.lam), S(0));
}

// Few rows, long horizons: one block per row. Thread i owns steps [i*len, (i+1)*len); it first
// computes its chunk's affine map, thread 0 joins the maps into each chunk's incoming advantage,
// then every thread writes its chunk. The same three passes as the CPU's chunked scan.
template <typename S>
__global__ void gae_split_kernel(GaeArgs a) {
  __shared__ S map_a[kMaxSplitThreads];
  __shared__ S map_b[kMaxSplitThreads];
  __shared__ S carry[kMaxSplitThreads];
  const S gamma = S(a.gamma), gamma_lam = S(a.gamma * a.lam);
  const GaeRow<S> row = gae_row<S>(a, blockIdx.x);
  const int i = threadIdx.x;
  const int64_t len = (a.T + blockDim.x - 1) / blockDim.x;
  const int64_t t0 = min(a.T, i * len), t1 = min(a.T, t0 + len);

  const AffineMap<S> map = gae_chunk_map(row, t0, t1, gamma, gamma_lam);
  map_a[i] = map.a;
  map_b[i] = map.b;
  __syncthreads();
  if (i == 0) {
    S next = S(0);
    for (int j = blockDim.x - 1; j >= 0; --j) {
      carry[j] = next;
      next = gae_step(map_a[j], map_b[j], next);
    }
  }
  __syncthreads();
  gae_chunk_write(row, t0, t1, gamma, gamma_lam, carry[i]);
}

template <typename S>
void launch(const GaeArgs& a, cudaStream_t stream) {
  if (a.N < kSplitRowsBelow && a.T >= kSplitHorizonFrom) {
    const int64_t wanted = (a.T + kMinStepsPerThread - 1) / kMinStepsPerThread;
    const int threads = static_cast<int>(std::min<int64_t>(kMaxSplitThreads, (wanted + 31) / 32 * 32));
    gae_split_kernel<S><<<static_cast<unsigned>(a.N), threads, 0, stream>>>(a);
  } else {
    const auto blocks = static_cast<unsigned>((a.N + kColumnThreads - 1) / kColumnThreads);
    gae_column_kernel<S><<<blocks, kColumnThreads, 0, stream>>>(a);
  }
}

}  // namespace

void gae_cuda(const GaeArgs& args, int device, std::uintptr_t stream_handle) {
  if (args.T == 0 || args.N == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.gae", [&] { args.is_f64 ? launch<double>(args, stream) : launch<float>(args, stream); });
}

}  // namespace fastppo
