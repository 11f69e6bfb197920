// The fused actor-critic MLP: dense layers read in place from torch's parameters (Linear's weight
// [out, in] row-major and bias [out]), a policy head (categorical or multi-discrete, either one
// optionally over the legal actions of a mask; diagonal Gaussian, optionally tanh-squashed), and two
// fused calls that make a PPO step on the CPU:
//   act:    observations -> sampled action, its log-prob and the value (rollout inference);
//   update: a minibatch gathered by index -> forward, heads, the clipped loss (fastppo_math.h's
//           element math, as fastppo.ppo_loss computes it), backward into the parameter
//           gradients, the global grad-norm clip and Adam, over flat parameter buffers.
// mlp_forward / mlp_backward are the building blocks, also bound on their own for an autograd op.
#pragma once

#include <cstdint>

#include "fastppo_math.h"
#include "ppo_loss.h"
#include "rnn.h"

namespace fastppo {

constexpr int kMaxMlpLayers = 16;

// One Linear layer: weight [out, in], bias [out], and where their gradients go (null: not needed).
struct DenseLayer {
  const void* w = nullptr;
  const void* b = nullptr;
  void* grad_w = nullptr;
  void* grad_b = nullptr;
  void* wt = nullptr;  // W^T [in, out], kept by an ActorCriticSpec's owner for few-row forwards
  int64_t in = 0, out = 0;
};

// A stack of Linear layers with the activation after each, except after the last one when
// `last_linear` (an actor's or critic's output layer).
struct MlpSpec {
  int n = 0;
  DenseLayer layer[kMaxMlpLayers];
  bool last_linear = true;
  int act = kActTanh;

  int64_t in_dim() const { return layer[0].in; }
  int64_t out_dim() const { return layer[n - 1].out; }
  // Elements of the saved outputs of all layers for `rows` rows.
  int64_t saved_size(int64_t rows) const {
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += rows * layer[i].out;
    return total;
  }
};

// Forward of rows x [rows, in] (row stride ldx): every layer's output is kept in `saved`
// (layer after layer, [rows, out] each, saved_size(rows) elements); the last one is the output.
void mlp_forward_cpu(const MlpSpec& spec, bool is_f64, int64_t rows, const void* x, int64_t ldx, void* saved);
// Backward given d output [rows, out_dim]: writes (not accumulates) every layer's grad_w / grad_b and,
// when grad_x is not null, d x [rows, in] (contiguous).
void mlp_backward_cpu(const MlpSpec& spec, bool is_f64, int64_t rows, const void* x, int64_t ldx,
                      const void* saved, const void* grad_out, void* grad_x);

// An LSTM of a recurrent actor-critic: torch.nn.LSTM's parameters (rnn.h's layout, in the flat
// buffer) and where their gradients go.
struct LstmLayer {
  const void* w_ih = nullptr;
  const void* w_hh = nullptr;
  const void* b_ih = nullptr;  // null: no bias
  const void* b_hh = nullptr;
  void* grad_w_ih = nullptr;
  void* grad_w_hh = nullptr;
  void* grad_b_ih = nullptr;
  void* grad_b_hh = nullptr;
  int64_t F = 0, H = 0;
  // W_ih^T [F, 4H] and W_hh^T [H, 4H] as of the last update or refresh (see wt_current).
  void* w_ih_t = nullptr;
  void* w_hh_t = nullptr;
};

// The actor-critic: an optional shared trunk, then the actor (-> logits [A] or means [D]) and the
// critic (-> [1]) on the trunk's output (or on the observation when the trunk is empty).
//
// Discrete heads have K >= 1 categorical components side by side over the A logits (K = 1: the
// categorical head; else the multi-discrete one): component k owns columns [offsets[k],
// offsets[k + 1]) and its action indexes them from 0; actions are int64 [rows, K] ([rows] for K = 1),
// the log-prob and entropy are summed over the components. An optional mask of legal actions
// (bool [rows, A], flat over the components) follows heads.h's rules per component: the softmax is
// over the legal logits only, an illegal logit's gradient is exactly 0, and a component with no
// legal action has no choice (action 0, log-prob 0, entropy 0, zero gradient).
// The Gaussian's action is its sample; a squashed one's is the sample u before the squash, its
// log-prob the Gaussian's at u minus sum log(1 - tanh(u)^2) (tanh_log_det), its entropy the
// Gaussian's and its gradients the Gaussian's (the log-det is data), as heads.h's squashed head.
struct ActorCriticSpec {
  bool is_f64 = false;
  MlpSpec trunk, actor, critic;
  // A recurrent actor-critic (no trunk): the observations go through an LSTM over the minibatch's
  // steps (rnn.h) and the actor and the critic read its output: n_rnn 2, each its own LSTM (rnn[0]
  // the actor's, rnn[1] the critic's); 1, one LSTM read by both. act() runs one step of it from the
  // caller's state, update() the minibatch's steps from the rollout's.
  int n_rnn = 0;
  LstmLayer rnn[2];
  bool continuous = false;
  bool squashed = false;            // continuous: the tanh-squashed Gaussian
  int64_t n_out = 0;                // A or D
  int64_t K = 1;                    // discrete: the number of components
  const int64_t* offsets = nullptr;  // discrete: [K + 1] column offsets, 0 ... A
  const void* log_std = nullptr;    // [D], state-independent (continuous)
  void* grad_log_std = nullptr;
  // Flat buffers holding every parameter (the layers and log_std point into `params`), their
  // gradients and Adam's moments, each n_params long.
  void* params = nullptr;
  void* grads = nullptr;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  int64_t n_params = 0;
  // Every layer's `wt` (and every LSTM's w_ih_t, w_hh_t) is allocated and holds W^T as of the last
  // update or refresh: the forward passes multiply by it, and update refreshes it after its Adam step.
  bool wt_current = false;

  int64_t obs_dim() const { return n_rnn > 0 ? rnn[0].F : trunk.n > 0 ? trunk.in_dim() : actor.in_dim(); }
};

// Rollout inference for `rows` observations [rows, obs_dim] (row stride ldobs), with noise given by
// the caller: uniform [rows, A] for the Gumbel-max sample of each discrete component, standard
// normal [rows, D] for a Gaussian. Writes action (int64 [rows, K] / [rows, D] in the parameters'
// type), log-prob and value [rows], and, when set, the environment's action: int32 [rows, K], or
// float32 [rows, D]: the sample clipped to [low, high], or low + (tanh(u) + 1) (high - low) / 2 for
// the squashed head (computed in double, then clipped so that rounding stays inside).
// A recurrent spec's step reads and updates `state` [2 * n_rnn, rows, H] (h, c of each LSTM; reset
// to zeros first where starts[row] != 0) and reads obs as the LSTMs' input.
struct ActArgs {
  int64_t rows = 0;
  const void* obs = nullptr; int64_t ldobs = 0;
  const void* noise = nullptr;  // null: the greedy action (argmax among the legal actions / the mean)
  const uint8_t* mask = nullptr;  // discrete: legal actions, bool [rows, A] contiguous; null: all legal
  void* action = nullptr;
  void* logprob = nullptr;
  void* value = nullptr;
  void* env_action = nullptr;
  const float* low = nullptr;   // [D] (continuous env_action)
  const float* high = nullptr;
  void* state = nullptr;            // recurrent: [2 * n_rnn, rows, H], in and out
  const uint8_t* starts = nullptr;  // recurrent: [rows] (1: the row starts an episode), or null: none
};

void actor_critic_act_cpu(const ActorCriticSpec& spec, const ActArgs& args);
// Refreshes the cached W^T of every layer (after the parameters were changed from outside).
void actor_critic_transpose_cpu(const ActorCriticSpec& spec);

// One minibatch update on rows idx[0..M) of a rollout of B rows (all arrays contiguous over the
// rollout): obs [B, obs_dim], actions (int64 [B, K] or [B, D] in the parameters' type), old log-prob,
// advantages, returns, old values [B], mask (uint8 [B] or null), action_mask (a discrete head's
// legal actions, bool [B, A], or null). Loss, options and stats as fastppo.ppo_loss with
// agg="token-mean".
struct UpdateArgs : LossOptions {
  int64_t M = 0;
  const int64_t* idx = nullptr;
  const void* obs = nullptr;
  const void* actions = nullptr;
  const void* old_logprob = nullptr;
  const void* advantages = nullptr;
  const void* returns = nullptr;
  const void* old_values = nullptr;
  const uint8_t* mask = nullptr;
  const uint8_t* action_mask = nullptr;
  double max_grad_norm = 0.5;  // <= 0: no clip
  AdamStep adam{};
  double* stats = nullptr;     // out [kLossStats + 1]: pg, v, entropy, approx_kl, old_approx_kl, clipfrac, grad norm
  // Data-parallel training: as PpoLossArgs::group / group_size. With apply_step false the update
  // stops once the gradients are in the flat buffer (for their all-reduce); apply does the rest.
  const double* group = nullptr;
  double group_size = 1.0;
  bool apply_step = true;
  // A recurrent spec's rollout: T steps of N environments, row t * N + e. A minibatch is whole
  // environments: idx[t * n + j] (M = T * n) is step t of its j-th environment, in time-major order.
  // starts: uint8 [B], reset the state to zeros before the row; state: [2 * n_rnn, N, H], the h and
  // c of each LSTM when the rollout began.
  int64_t T = 0, N = 0;
  const uint8_t* starts = nullptr;
  const void* state = nullptr;
};

void actor_critic_update_cpu(const ActorCriticSpec& spec, const UpdateArgs& args);
// The grad-norm clip (its norm into args.stats[kLossStats]) and the Adam step over the flat buffers.
void actor_critic_apply_cpu(const ActorCriticSpec& spec, const UpdateArgs& args);

}  // namespace fastppo
