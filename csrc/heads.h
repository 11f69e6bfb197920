// Fused policy heads: categorical (logits -> log-prob of the taken action, entropy) and diagonal
// Gaussian (mean, log_std -> log-prob summed over dimensions, entropy), forward and backward.
// The per-element math is in fastppo_math.h, shared by the CPU loops and the CUDA kernels.
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

// Gumbel-max sampling of one action per row from softmax(logits / temperature): `noise` holds
// uniform [0, 1) draws ([rows, A], row stride noise_sr, contiguous columns, in the accumulation
// type: float for bf16 / f16 logits); the sampled indices go to actions_out ([rows] int64). The log-prob and entropy of the
// sample then come from categorical_forward with these actions.
void categorical_sample_cpu(const CategoricalArgs& args, const void* noise, int64_t noise_sr, int64_t* actions_out);

// Returns the first row whose action is out of range, or -1 (CPU: checked before anything runs).
int64_t categorical_check_actions_cpu(const CategoricalArgs& args);
void categorical_forward_cpu(const CategoricalArgs& args);
void categorical_backward_cpu(const CategoricalArgs& args);
// CUDA: a row with an out-of-range action gets NaN log-prob and entropy and zero gradient
// (raising would need a host sync).
void categorical_forward_cuda(const CategoricalArgs& args, int device, std::uintptr_t stream);
void categorical_backward_cuda(const CategoricalArgs& args, int device, std::uintptr_t stream);

struct NormalArgs {
  int64_t rows = 0, D = 0;
  bool is_f64 = false;
  const void* mean = nullptr; int64_t mean_sr = 0, mean_sc = 1;
  const void* log_std = nullptr; int64_t log_std_sr = 0, log_std_sc = 1;  // sr = 0: one log_std shared by all rows
  const void* actions = nullptr; int64_t actions_sr = 0, actions_sc = 1;
  void* logprob = nullptr;  // [rows]
  void* entropy = nullptr;  // [rows]
  const void* grad_logprob = nullptr; int64_t grad_logprob_s = 0;  // null = zero
  const void* grad_entropy = nullptr; int64_t grad_entropy_s = 0;
  void* grad_mean = nullptr;     // contiguous [rows, D]
  void* grad_log_std = nullptr;  // contiguous [rows, D], or [D] when shared
  double* partials = nullptr;    // workspace for the shared log_std: [chunks, D]
};

constexpr int64_t kNormalChunk = 1024;  // rows per partial sum of a shared log_std's gradient

void normal_forward_cpu(const NormalArgs& args);
void normal_backward_cpu(const NormalArgs& args);
void normal_forward_cuda(const NormalArgs& args, int device, std::uintptr_t stream);
void normal_backward_cuda(const NormalArgs& args, int device, std::uintptr_t stream);

}  // namespace fastppo
