// The fused policy heads on CUDA. Categorical: one block per row streams the logits once with
// each thread's online softmax state, then merges the states in a fixed tree (same bits every
// run); backward writes each logit's gradient from the row's saved lse and entropy. bf16 / f16
// logits are loaded as they are stored and computed in float; log-prob, entropy and the logits'
// gradient are stored in the logits' type, the saved lse and entropy in float. Non-finite logits as on the CPU (the softmax state's rules): a row
// with a NaN or +inf logit, or only -inf ones, is NaN; a masked (-inf) logit has p = 0. With a mask
// of legal actions an illegal logit is never read and gets gradient 0 (CategoricalArgs). Multi-
// discrete: one warp per row, each lane one component at a time (its columns streamed through the
// same online softmax), the row's sums over components merged in a fixed shuffle tree; backward
// one thread per (row, component). Diagonal Gaussian (and its tanh-squashed form): one thread per
// row; a shared log_std's gradient is summed per chunk of rows and then over chunks in order.
// Math: fastppo_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>


#include "cuda_launch.h"
#include "cuda_reduce.cuh"
#include "heads.h"

namespace fastppo {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColumnThreads = 256;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
// Rounded to nearest even, as torch casts.
template <typename T, typename S> __device__ __forceinline__ T from_acc(S x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }

// An incoming gradient of row r (null: zero), in the accumulation type.
template <typename T, typename S>
__device__ __forceinline__ S row_grad(const void* g, int64_t stride, int64_t r) {
  return g ? S(to_acc(static_cast<const T*>(g)[r * stride])) : S(0);
}

// Logit j of row r in the accumulation type, unscaled and at the temperature.
template <typename T, typename S>
__device__ __forceinline__ S raw_logit(const CategoricalArgs& a, int64_t r, int64_t j) {
  return to_acc(static_cast<const T*>(a.logits)[r * a.logits_sr + j * a.logits_sc]);
}
template <typename T, typename S>
__device__ __forceinline__ S logit(const CategoricalArgs& a, int64_t r, int64_t j) {
  return raw_logit<T, S>(a, r, j) * S(a.inv_temperature);
}

template <typename T, typename S>
__global__ void categorical_forward_kernel(CategoricalArgs a) {
  __shared__ SoftmaxState<S> shared[kRowThreads];
  const int64_t r = blockIdx.x;
  SoftmaxState<S> state = softmax_empty<S>();
  int legal_seen = 0;
  for (int64_t j = threadIdx.x; j < a.A; j += blockDim.x) {
    if (!categorical_legal(a, r, j)) continue;
    legal_seen = 1;
    state = softmax_push(state, logit<T, S>(a, r, j));
  }
  const SoftmaxState<S> total = block_reduce<kRowThreads>(state, shared, MergeSoftmax{});
  const bool any = a.mask ? __syncthreads_or(legal_seen) != 0 : true;  // uniform: every thread calls it or none
  if (threadIdx.x == 0) {
    const int64_t action = categorical_action(a, r);
    // A taken illegal action: no choice (0) in a row without a legal action, else NaN.
    const bool illegal = action >= 0 && !categorical_legal(a, r, action);
    const S nan = S(NAN), bad = illegal && !any ? S(0) : nan;
    const bool ok = action >= 0 && !illegal;
    const S lse = ok ? softmax_lse(total) : bad;
    const S entropy = ok ? softmax_entropy(total) : bad;
    const S logprob = ok ? categorical_logprob(raw_logit<T, S>(a, r, action), S(a.inv_temperature), lse) : bad;
    static_cast<S*>(a.lse)[r] = lse;
    static_cast<S*>(a.entropy_acc)[r] = entropy;
    static_cast<T*>(a.entropy)[r] = from_acc<T, S>(entropy);
    static_cast<T*>(a.logprob)[r] = from_acc<T, S>(logprob);
  }
}

template <typename T, typename S>
__device__ void categorical_backward_element(const CategoricalArgs& a, int64_t r, int64_t j) {
  const int64_t action = categorical_action(a, r);
  T* grad = static_cast<T*>(a.grad_logits) + r * a.A;
  if (action < 0 || !categorical_legal(a, r, action) || !categorical_legal(a, r, j)) {
    grad[j] = from_acc<T, S>(S(0));
    return;
  }
  const S g_logprob = row_grad<T, S>(a.grad_logprob, a.grad_logprob_s, r);
  const S g_entropy = row_grad<T, S>(a.grad_entropy, a.grad_entropy_s, r);
  const S lse = static_cast<const S*>(a.lse)[r];
  const S entropy = static_cast<const S*>(a.entropy_acc)[r];
  const S x = logit<T, S>(a, r, j);
  const S p = softmax_prob(x, lse, ScalarExp{});
  const S d = categorical_grad(x, p, lse, entropy, g_logprob, g_entropy) + (j == action ? g_logprob : S(0));
  grad[j] = from_acc<T, S>(S(a.inv_temperature) * d);
}

template <typename T, typename S>
__global__ void categorical_backward_kernel(CategoricalArgs a) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.A) return;
  for (int64_t r = blockIdx.y; r < a.rows; r += gridDim.y) categorical_backward_element<T, S>(a, r, j);
}

template <typename T, typename S>
void categorical_launch(const CategoricalArgs& a, cudaStream_t stream, bool forward) {
  if (forward) {
    categorical_forward_kernel<T, S><<<static_cast<unsigned>(a.rows), kRowThreads, 0, stream>>>(a);
  } else {
    const unsigned rows = static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535);  // grid.y limit; rows loop beyond it
    const dim3 grid(static_cast<unsigned>((a.A + kColumnThreads - 1) / kColumnThreads), rows);
    categorical_backward_kernel<T, S><<<grid, kColumnThreads, 0, stream>>>(a);
  }
}

void categorical_run(const CategoricalArgs& a, int device, std::uintptr_t stream_handle, bool forward) {
  if (a.rows == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.categorical_logprob_entropy", [&] {
    switch (a.dtype) {
      case kF64: categorical_launch<double, double>(a, stream, forward); break;
      case kBF16: categorical_launch<__nv_bfloat16, float>(a, stream, forward); break;
      case kF16: categorical_launch<__half, float>(a, stream, forward); break;
      default: categorical_launch<float, float>(a, stream, forward); break;
    }
  });
}

// ------------------------------------------------------------------ multi-discrete

constexpr int kWarp = 32;
constexpr int kMultiRowsPerBlock = kRowThreads / kWarp;

template <typename T, typename S>
__device__ __forceinline__ S multi_logit(const MultiCategoricalArgs& a, int64_t r, int64_t j) {
  return to_acc(static_cast<const T*>(a.logits)[r * a.logits_sr + j * a.logits_sc]);
}

template <typename T, typename S>
__device__ __forceinline__ S multi_grad_in(const void* g, int64_t sr, int64_t sc, int64_t r, int64_t k) {
  return g ? S(to_acc(static_cast<const T*>(g)[r * sr + k * sc])) : S(0);
}

// One warp per row; lane l takes components l, l + 32, ...: the online softmax over the component's
// columns (its legal ones), then its log-prob and entropy (CategoricalArgs' rules for an illegal or
// out-of-range action), stored per component; the row's sums over components are merged lane by
// lane in a fixed shuffle tree.
template <typename T, typename S>
__global__ void multi_categorical_forward_kernel(MultiCategoricalArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMultiRowsPerBlock + threadIdx.x / kWarp;
  if (r >= a.rows) return;  // the whole warp leaves together: the shuffles below see full warps only
  S logprob_sum = 0, entropy_sum = 0;
  for (int64_t k = lane; k < a.K; k += kWarp) {
    const int64_t c0 = a.offsets[k], c1 = a.offsets[k + 1];
    SoftmaxState<S> state = softmax_empty<S>();
    bool any = false;
    for (int64_t j = c0; j < c1; ++j) {
      if (!multi_categorical_legal(a, r, j)) continue;
      any = true;
      state = softmax_push(state, multi_logit<T, S>(a, r, j));
    }
    const int64_t action = multi_categorical_action(a, r, k);
    const bool illegal = action >= 0 && !multi_categorical_legal(a, r, c0 + action);
    const S bad = illegal && !any ? S(0) : S(NAN);
    const bool ok = action >= 0 && !illegal;
    const S lse = ok ? softmax_lse(state) : bad;
    const S entropy = ok ? softmax_entropy(state) : bad;
    const S logprob = ok ? categorical_logprob(multi_logit<T, S>(a, r, c0 + action), S(1), lse) : bad;
    const int64_t rk = r * a.K + k;
    static_cast<S*>(a.lse)[rk] = lse;
    static_cast<S*>(a.entropy_acc)[rk] = entropy;
    if (a.reduce) {
      logprob_sum += logprob;
      entropy_sum += entropy;
    } else {
      static_cast<T*>(a.logprob)[rk] = from_acc<T, S>(logprob);
      static_cast<T*>(a.entropy)[rk] = from_acc<T, S>(entropy);
    }
  }
  if (!a.reduce) return;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    logprob_sum += __shfl_down_sync(0xffffffffu, logprob_sum, offset);
    entropy_sum += __shfl_down_sync(0xffffffffu, entropy_sum, offset);
  }
  if (lane == 0) {
    static_cast<T*>(a.logprob)[r] = from_acc<T, S>(logprob_sum);
    static_cast<T*>(a.entropy)[r] = from_acc<T, S>(entropy_sum);
  }
}

// One thread per (row, component): its columns' gradients from the saved lse and entropy; 0 at an
// illegal column and on a component whose action is illegal or out of range.
template <typename T, typename S>
__global__ void multi_categorical_backward_kernel(MultiCategoricalArgs a) {
  const int64_t total = a.rows * a.K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.K, k = i % a.K;
    const int64_t c0 = a.offsets[k], c1 = a.offsets[k + 1];
    T* grad = static_cast<T*>(a.grad_logits) + r * a.A;
    const int64_t action = multi_categorical_action(a, r, k);
    const bool live = action >= 0 && multi_categorical_legal(a, r, c0 + action);
    const S g_logprob = multi_grad_in<T, S>(a.grad_logprob, a.grad_logprob_sr, a.grad_logprob_sc, r, k);
    const S g_entropy = multi_grad_in<T, S>(a.grad_entropy, a.grad_entropy_sr, a.grad_entropy_sc, r, k);
    const S lse = static_cast<const S*>(a.lse)[i];
    const S entropy = static_cast<const S*>(a.entropy_acc)[i];
    for (int64_t j = c0; j < c1; ++j) {
      S d = S(0);
      if (live && multi_categorical_legal(a, r, j)) {
        const S x = multi_logit<T, S>(a, r, j);
        d = categorical_grad(x, softmax_prob(x, lse, ScalarExp{}), lse, entropy, g_logprob, g_entropy) +
            (j == c0 + action ? g_logprob : S(0));
      }
      grad[j] = from_acc<T, S>(d);
    }
  }
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30));
}

template <typename T, typename S>
void multi_categorical_launch(const MultiCategoricalArgs& a, cudaStream_t stream, bool forward) {
  if (forward) {
    const int64_t blocks = (a.rows + kMultiRowsPerBlock - 1) / kMultiRowsPerBlock;  // grid.x: up to 2^31 - 1
    multi_categorical_forward_kernel<T, S><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(a);
  } else {
    multi_categorical_backward_kernel<T, S><<<grid_for(a.rows * a.K, kColumnThreads), kColumnThreads, 0, stream>>>(a);
  }
}

void multi_categorical_run(const MultiCategoricalArgs& a, int device, std::uintptr_t stream_handle, bool forward) {
  if (a.rows == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.multi_categorical_logprob_entropy", [&] {
    switch (a.dtype) {
      case kF64: multi_categorical_launch<double, double>(a, stream, forward); break;
      case kBF16: multi_categorical_launch<__nv_bfloat16, float>(a, stream, forward); break;
      case kF16: multi_categorical_launch<__half, float>(a, stream, forward); break;
      default: multi_categorical_launch<float, float>(a, stream, forward); break;
    }
  });
}

// ------------------------------------------------------------------ diagonal Gaussian

template <typename S>
__device__ __forceinline__ S normal_at(const void* base, int64_t sr, int64_t sc, int64_t r, int64_t d) {
  return static_cast<const S*>(base)[r * sr + d * sc];
}

template <typename S>
__global__ void normal_forward_kernel(NormalArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.rows) return;
  S logprob = 0, entropy = 0;
  for (int64_t d = 0; d < a.D; ++d) {
    const S log_std = normal_at<S>(a.log_std, a.log_std_sr, a.log_std_sc, r, d);
    const S inv_var = normal_inv_var(log_std);
    const S u = normal_point<S>(a, r, d);
    logprob += normal_logprob(u, normal_at<S>(a.mean, a.mean_sr, a.mean_sc, r, d), log_std, inv_var);
    if (a.squashed) logprob -= tanh_log_det(u);
    entropy += normal_entropy(log_std);
  }
  static_cast<S*>(a.logprob)[r] = logprob;
  static_cast<S*>(a.entropy)[r] = entropy;
}

// Per-row gradients; with a shared log_std, grad_log_std is left to the two kernels below.
template <typename S>
__global__ void normal_backward_kernel(NormalArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= a.rows) return;
  const S g_logprob = a.grad_logprob ? static_cast<const S*>(a.grad_logprob)[r * a.grad_logprob_s] : S(0);
  const S g_entropy = a.grad_entropy ? static_cast<const S*>(a.grad_entropy)[r * a.grad_entropy_s] : S(0);
  for (int64_t d = 0; d < a.D; ++d) {
    const S action = normal_point<S>(a, r, d);
    const S mean = normal_at<S>(a.mean, a.mean_sr, a.mean_sc, r, d);
    const S inv_var = normal_inv_var(normal_at<S>(a.log_std, a.log_std_sr, a.log_std_sc, r, d));
    static_cast<S*>(a.grad_mean)[r * a.D + d] = normal_grad_mean(action, mean, inv_var, g_logprob);
    if (a.log_std_sr != 0)
      static_cast<S*>(a.grad_log_std)[r * a.D + d] = normal_grad_log_std(action, mean, inv_var, g_logprob, g_entropy);
  }
}

// Shared log_std: thread (chunk k, dimension d) sums rows [k*kNormalChunk, (k+1)*kNormalChunk).
template <typename S>
__global__ void normal_shared_partials_kernel(NormalArgs a, int64_t chunks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= chunks * a.D) return;
  const int64_t k = i / a.D, d = i % a.D;
  const int64_t r1 = (k + 1) * kNormalChunk < a.rows ? (k + 1) * kNormalChunk : a.rows;
  const S inv_var = normal_inv_var(normal_at<S>(a.log_std, 0, a.log_std_sc, 0, d));
  double sum = 0.0;
  for (int64_t r = k * kNormalChunk; r < r1; ++r) {
    const S g_logprob = a.grad_logprob ? static_cast<const S*>(a.grad_logprob)[r * a.grad_logprob_s] : S(0);
    const S g_entropy = a.grad_entropy ? static_cast<const S*>(a.grad_entropy)[r * a.grad_entropy_s] : S(0);
    sum += normal_grad_log_std(normal_point<S>(a, r, d), normal_at<S>(a.mean, a.mean_sr, a.mean_sc, r, d), inv_var,
                               g_logprob, g_entropy);
  }
  a.partials[k * a.D + d] = sum;
}

template <typename S>
__global__ void normal_shared_sum_kernel(NormalArgs a, int64_t chunks) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= a.D) return;
  double sum = 0.0;
  for (int64_t k = 0; k < chunks; ++k) sum += a.partials[k * a.D + d];
  static_cast<S*>(a.grad_log_std)[d] = S(sum);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <typename S>
void normal_launch(const NormalArgs& a, cudaStream_t stream, bool forward) {
  if (forward) {
    normal_forward_kernel<S><<<blocks_for(a.rows, kColumnThreads), kColumnThreads, 0, stream>>>(a);
    return;
  }
  normal_backward_kernel<S><<<blocks_for(a.rows, kColumnThreads), kColumnThreads, 0, stream>>>(a);
  if (a.log_std_sr == 0) {
    const int64_t chunks = (a.rows + kNormalChunk - 1) / kNormalChunk;
    normal_shared_partials_kernel<S><<<blocks_for(chunks * a.D, kColumnThreads), kColumnThreads, 0, stream>>>(a, chunks);
    normal_shared_sum_kernel<S><<<blocks_for(a.D, kColumnThreads), kColumnThreads, 0, stream>>>(a, chunks);
  }
}

void normal_run(const NormalArgs& a, int device, std::uintptr_t stream_handle, bool forward) {
  if (a.rows == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  on_device(device, "fastppo.normal_logprob_entropy",
            [&] { a.is_f64 ? normal_launch<double>(a, stream, forward) : normal_launch<float>(a, stream, forward); });
}

}  // namespace

void categorical_forward_cuda(const CategoricalArgs& a, int device, std::uintptr_t stream) { categorical_run(a, device, stream, true); }
void categorical_backward_cuda(const CategoricalArgs& a, int device, std::uintptr_t stream) { categorical_run(a, device, stream, false); }
void multi_categorical_forward_cuda(const MultiCategoricalArgs& a, int device, std::uintptr_t stream) {
  multi_categorical_run(a, device, stream, true);
}
void multi_categorical_backward_cuda(const MultiCategoricalArgs& a, int device, std::uintptr_t stream) {
  multi_categorical_run(a, device, stream, false);
}
void normal_forward_cuda(const NormalArgs& a, int device, std::uintptr_t stream) { normal_run(a, device, stream, true); }
void normal_backward_cuda(const NormalArgs& a, int device, std::uintptr_t stream) { normal_run(a, device, stream, false); }

}  // namespace fastppo
