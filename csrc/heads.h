// Fused policy heads: categorical (logits -> log-prob of the taken action, entropy; optionally over
// the legal actions of a mask), multi-discrete (K categorical components over concatenated logits),
// diagonal Gaussian (mean, log_std -> log-prob summed over dimensions, entropy) and its
// tanh-squashed form, forward and backward. The per-element math is in fastppo_math.h, shared by
// the CPU loops and the CUDA kernels.
#pragma once

#include <cstdint>

#include "fastppo_math.h"

namespace fastppo {

// Element types of the logits. bf16 / f16 logits are read as they are stored (no wider copy is
// made) and computed in float, on the CPU (lowp.h) and on CUDA alike.
enum ScalarType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

struct CategoricalArgs {
  int64_t rows = 0, A = 0;
  int dtype = kF32;
  const void* logits = nullptr; int64_t logits_sr = 0, logits_sc = 1;
  const void* actions = nullptr; int actions_type = kFlagI64; int64_t actions_s = 0;
  double inv_temperature = 1.0;  // x = logits / temperature
  // Legal actions: [rows, A] bytes (bool) read through strides, null when every action is legal. An
  // illegal logit is never used (whatever it holds, NaN included) and its gradient is 0. A row whose
  // taken action is illegal has no choice when no action of it is legal: log-prob 0, entropy 0 and
  // zero gradient; with a legal action (a taken illegal action: refused on the CPU before the kernel
  // runs) it is NaN with zero gradient, as an out-of-range action.
  const uint8_t* mask = nullptr; int64_t mask_sr = 0, mask_sc = 1;
  // Forward outputs, [rows] each: the log-prob of the action and the entropy in the logits' type,
  // and the stats backward reads, in the accumulation type (float for bf16 / f16, else as the
  // logits): the log-sum-exp and the entropy again, unrounded.
  void* logprob = nullptr;
  void* entropy = nullptr;
  void* lse = nullptr;
  void* entropy_acc = nullptr;
  // Backward inputs: incoming gradients of logprob and entropy ([rows], strided, in the logits'
  // type; null = zero), lse and entropy_acc as the forward pass wrote them, and the output:
  // contiguous [rows, A] gradient of the logits, in the logits' type.
  const void* grad_logprob = nullptr; int64_t grad_logprob_s = 0;
  const void* grad_entropy = nullptr; int64_t grad_entropy_s = 0;
  void* grad_logits = nullptr;
};

// The action of a row as an index, or -1 when it is out of [0, A).
FASTPPO_HD int64_t categorical_action(const CategoricalArgs& a, int64_t row) {
  const int64_t offset = row * a.actions_s;
  const int64_t action = a.actions_type == kFlagI32 ? static_cast<const int32_t*>(a.actions)[offset]
                                                    : static_cast<const int64_t*>(a.actions)[offset];
  return action >= 0 && action < a.A ? action : -1;
}

// Whether action j of a row is legal (always, without a mask).
FASTPPO_HD bool categorical_legal(const CategoricalArgs& a, int64_t row, int64_t j) {
  return !a.mask || a.mask[row * a.mask_sr + j * a.mask_sc] != 0;
}

// Whether any of n mask bytes (stride apart) is set.
FASTPPO_HD bool any_legal(const uint8_t* mask, int64_t stride, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (mask[j * stride]) return true;
  return false;
}

// Gumbel-max sampling of one action per row from softmax(logits / temperature): `noise` holds
// uniform [0, 1) draws ([rows, A], row stride noise_sr, contiguous columns, in the accumulation
// type: float for bf16 / f16 logits); the sampled indices go to actions_out ([rows] int64). The log-prob and entropy of the
// sample then come from categorical_forward with these actions.
void categorical_sample_cpu(const CategoricalArgs& args, const void* noise, int64_t noise_sr, int64_t* actions_out);

// Returns the first row whose action is out of range, or -1 (CPU: checked before anything runs).
int64_t categorical_check_actions_cpu(const CategoricalArgs& args);
// Returns the first row whose (in-range) action its mask marks illegal while another action of the
// row is legal, or -1.
int64_t categorical_check_mask_cpu(const CategoricalArgs& args);
void categorical_forward_cpu(const CategoricalArgs& args);
void categorical_backward_cpu(const CategoricalArgs& args);
// CUDA: a row with an out-of-range action gets NaN log-prob and entropy and zero gradient
// (raising would need a host sync).
void categorical_forward_cuda(const CategoricalArgs& args, int device, std::uintptr_t stream);
void categorical_backward_cuda(const CategoricalArgs& args, int device, std::uintptr_t stream);

// Multi-discrete head: K categorical components over one row of concatenated logits [rows, A],
// A = sum of the components' sizes; component k owns columns [offsets[k], offsets[k + 1]) and its
// action actions[r, k] indexes them from 0. The mask is flat over the A columns, and each component
// follows the categorical head's rules (CategoricalArgs) on its own columns.
struct MultiCategoricalArgs {
  int64_t rows = 0, K = 0, A = 0;
  int dtype = kF32;
  const int64_t* offsets = nullptr;  // [K + 1] on the logits' device: 0, n_0, n_0 + n_1, ..., A
  const void* logits = nullptr; int64_t logits_sr = 0, logits_sc = 1;
  const void* actions = nullptr; int actions_type = kFlagI64; int64_t actions_sr = 0, actions_sc = 1;  // [rows, K]
  const uint8_t* mask = nullptr; int64_t mask_sr = 0, mask_sc = 1;  // [rows, A], null = all legal
  // Outputs in the logits' type: summed over the components, [rows] each (reduce), or [rows, K]
  // contiguous; and the stats backward reads, [rows, K] each in the accumulation type.
  bool reduce = true;
  void* logprob = nullptr;
  void* entropy = nullptr;
  void* lse = nullptr;
  void* entropy_acc = nullptr;
  // Backward: incoming gradients in the logits' type (null = zero), [rows] (column stride 0: the
  // row's gradient reaches every component) or [rows, K]; contiguous [rows, A] grad_logits.
  const void* grad_logprob = nullptr; int64_t grad_logprob_sr = 0, grad_logprob_sc = 0;
  const void* grad_entropy = nullptr; int64_t grad_entropy_sr = 0, grad_entropy_sc = 0;
  void* grad_logits = nullptr;
};

// Component k's action of a row as an index into its columns, or -1 when out of [0, n_k).
FASTPPO_HD int64_t multi_categorical_action(const MultiCategoricalArgs& a, int64_t row, int64_t k) {
  const int64_t offset = row * a.actions_sr + k * a.actions_sc;
  const int64_t action = a.actions_type == kFlagI32 ? static_cast<const int32_t*>(a.actions)[offset]
                                                    : static_cast<const int64_t*>(a.actions)[offset];
  return action >= 0 && action < a.offsets[k + 1] - a.offsets[k] ? action : -1;
}

// Whether column j (of the whole row) is legal.
FASTPPO_HD bool multi_categorical_legal(const MultiCategoricalArgs& a, int64_t row, int64_t j) {
  return !a.mask || a.mask[row * a.mask_sr + j * a.mask_sc] != 0;
}

// CPU checks before anything runs: the first r * K + k whose action is out of range, or whose
// action is illegal while another of the component is legal; -1 if none.
int64_t multi_categorical_check_actions_cpu(const MultiCategoricalArgs& args);
int64_t multi_categorical_check_mask_cpu(const MultiCategoricalArgs& args);
void multi_categorical_forward_cpu(const MultiCategoricalArgs& args);
void multi_categorical_backward_cpu(const MultiCategoricalArgs& args);
// Gumbel-max sample of each component (noise as categorical_sample_cpu's, [rows, A]) into
// actions_out ([rows, K] int64); multi_categorical_forward_cpu on them gives their log-prob.
void multi_categorical_sample_cpu(const MultiCategoricalArgs& args, const void* noise, int64_t noise_sr,
                                  int64_t* actions_out);
// CUDA: a component with an out-of-range or (among legal ones) illegal action is NaN with zero
// gradient, as categorical_forward_cuda's rows.
void multi_categorical_forward_cuda(const MultiCategoricalArgs& args, int device, std::uintptr_t stream);
void multi_categorical_backward_cuda(const MultiCategoricalArgs& args, int device, std::uintptr_t stream);

struct NormalArgs {
  int64_t rows = 0, D = 0;
  bool is_f64 = false;
  const void* mean = nullptr; int64_t mean_sr = 0, mean_sc = 1;
  const void* log_std = nullptr; int64_t log_std_sr = 0, log_std_sc = 1;  // sr = 0: one log_std shared by all rows
  const void* actions = nullptr; int64_t actions_sr = 0, actions_sc = 1;
  // Tanh-squashed: the Gaussian is over u and the action is tanh(u); u is pre_tanh where given,
  // else atanh of the action clamped to [-1 + eps, 1 - eps] (tanh_inverse), and the log-prob is
  // the Gaussian's at u minus sum log(1 - tanh(u)^2). The entropy and the gradients' formulas are
  // the Gaussian's at u (the log-det term depends on u alone, which is data).
  bool squashed = false;
  const void* pre_tanh = nullptr; int64_t pre_tanh_sr = 0, pre_tanh_sc = 1;
  void* logprob = nullptr;  // [rows]
  void* entropy = nullptr;  // [rows]
  const void* grad_logprob = nullptr; int64_t grad_logprob_s = 0;  // null = zero
  const void* grad_entropy = nullptr; int64_t grad_entropy_s = 0;
  void* grad_mean = nullptr;     // contiguous [rows, D]
  void* grad_log_std = nullptr;  // contiguous [rows, D], or [D] when shared
  double* partials = nullptr;    // workspace for the shared log_std: [chunks, D]
};

// The point at which the Gaussian of row r, dimension d is evaluated: the action, or for a squashed
// head u (pre_tanh, or the clamped atanh of the action).
template <typename S>
FASTPPO_HD S normal_point(const NormalArgs& a, int64_t r, int64_t d) {
  if (a.squashed && a.pre_tanh) return static_cast<const S*>(a.pre_tanh)[r * a.pre_tanh_sr + d * a.pre_tanh_sc];
  const S x = static_cast<const S*>(a.actions)[r * a.actions_sr + d * a.actions_sc];
  return a.squashed ? tanh_inverse(x) : x;
}

constexpr int64_t kNormalChunk = 1024;  // rows per partial sum of a shared log_std's gradient

void normal_forward_cpu(const NormalArgs& args);
void normal_backward_cpu(const NormalArgs& args);
void normal_forward_cuda(const NormalArgs& args, int device, std::uintptr_t stream);
void normal_backward_cuda(const NormalArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
