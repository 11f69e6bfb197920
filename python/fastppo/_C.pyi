# Typed stub of the compiled core (csrc/bindings*.cpp; tests/test_stub.py keeps it in step with the
# module). Strides are in elements. A buffer's data is an integer address or a numpy array (whose
# address is read in C++); device is -1 for the CPU, else a CUDA device index, and stream the
# caller's CUDA stream there (0 on the CPU). A workspace is float64 memory of the size the matching
# *_workspace function gives.
from typing import Any, Sequence

import numpy as np

_Data = int | np.ndarray
_Strided1 = tuple[_Data, int]  # (data, stride)
_Strided2 = tuple[_Data, int, int]  # (data, row stride, column stride)

__version__: str
WITH_CUDA: bool

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...

# GAE (csrc/bindings_gae.cpp)
def gae(
    T: int, N: int, dtype: str, rewards: _Strided2, values: _Strided2, dones: _Strided2, dones_dtype: str,
    terminated: _Strided2, terminated_dtype: str, last_value: _Strided1, adv: _Data, ret: _Data, gamma: float,
    lam: float, device: int, stream: int,
) -> None: ...

# PPO loss (csrc/bindings_loss.cpp)
LOSS_STATS: int

def ppo_loss_workspace(R: int, C: int) -> int: ...
def ppo_loss(
    R: int, C: int, dtype: str, new_logprob: _Strided2, old_logprob: _Strided2, advantages: _Strided2,
    new_value: _Strided2 | None, old_value: _Strided2 | None, returns: _Strided2 | None,
    entropy: _Strided2 | None, mask: _Strided2 | None, mask_dtype: str, clip_coef: float, vf_coef: float,
    ent_coef: float, vf_clip_coef: float, dual_clip: float, clip_vloss: bool, norm_adv: bool, agg: int,
    grad_logprob: _Data | None, grad_value: _Data | None, loss: _Data, stats: _Data, row_scale: _Data,
    workspace: _Data, device: int, stream: int, group: _Data | None = None, group_size: float = 1.0,
    clip_coef_high: float = -1.0, is_weights: _Strided2 | None = None, ref_logprob: _Strided2 | None = None,
    kl_coef: float = 0.0, kl_estimator: int = -1, sequence_ratio: bool = False,
) -> None: ...

# Policy heads (csrc/bindings_heads.cpp)
# mask: None or a bool [rows, A] spec of the legal actions.
def categorical_forward(
    rows: int, A: int, dtype: str, logits: _Strided2, actions: _Strided1, actions_dtype: str, temperature: float,
    logprob: _Data, entropy: _Data, stats: _Data, device: int, stream: int, mask: _Strided2 | None = None,
) -> None: ...
def categorical_sample(
    rows: int, A: int, dtype: str, logits: _Strided2, noise: int, noise_sr: int, temperature: float, actions: int,
    logprob: _Data, entropy: _Data, stats: _Data, mask: _Strided2 | None = None,
) -> None: ...
def categorical_backward(
    rows: int, A: int, dtype: str, logits: _Strided2, actions: _Strided1, actions_dtype: str, temperature: float,
    stats: _Data, grad_logprob: _Strided1 | None, grad_entropy: _Strided1 | None, grad_logits: _Data,
    device: int, stream: int, mask: _Strided2 | None = None,
) -> None: ...
# Multi-discrete: offsets is the address of int64 [K + 1] column offsets on the logits' device;
# stats [2, rows, K]; a gradient spec's component stride is 0 when reduce.
def multi_categorical_forward(
    rows: int, K: int, A: int, dtype: str, offsets: int, logits: _Strided2, actions: _Strided2, actions_dtype: str,
    mask: _Strided2 | None, reduce: bool, logprob: _Data, entropy: _Data, stats: _Data, device: int, stream: int,
) -> None: ...
def multi_categorical_sample(
    rows: int, K: int, A: int, dtype: str, offsets: int, logits: _Strided2, mask: _Strided2 | None, noise: int,
    noise_sr: int, actions: int, logprob: _Data, entropy: _Data, stats: _Data,
) -> None: ...
def multi_categorical_backward(
    rows: int, K: int, A: int, dtype: str, offsets: int, logits: _Strided2, actions: _Strided2, actions_dtype: str,
    mask: _Strided2 | None, reduce: bool, stats: _Data, grad_logprob: _Strided2 | None,
    grad_entropy: _Strided2 | None, grad_logits: _Data, device: int, stream: int,
) -> None: ...
# squashed: the tanh-squashed head, at pre_tanh ([rows, D] spec) when given.
def normal_forward(
    rows: int, D: int, dtype: str, mean: _Strided2, log_std: _Strided2, actions: _Strided2, logprob: _Data,
    entropy: _Data, device: int, stream: int, squashed: bool = False, pre_tanh: _Strided2 | None = None,
) -> None: ...
def normal_backward_workspace(rows: int, D: int, shared_log_std: bool) -> int: ...
def normal_backward(
    rows: int, D: int, dtype: str, mean: _Strided2, log_std: _Strided2, actions: _Strided2,
    grad_logprob: _Strided1 | None, grad_entropy: _Strided1 | None, grad_mean: _Data, grad_log_std: _Data,
    workspace: _Data | None, device: int, stream: int, squashed: bool = False, pre_tanh: _Strided2 | None = None,
) -> None: ...

# RLHF kernels over [R, C] token rows (csrc/bindings_rlhf.cpp)
def kl_rewards(
    R: int, C: int, dtype: str, logprob: _Strided2, ref_logprob: _Strided2, mask: _Strided2 | None, mask_dtype: str,
    scores: _Strided1 | None, beta: float, estimator: int, clamp: float, rewards: _Data, kl: _Data, last: _Data,
    device: int, stream: int,
) -> None: ...
def masked_whiten_workspace(R: int, C: int) -> int: ...
def masked_whiten(
    R: int, C: int, dtype: str, x: _Strided2, mask: _Strided2 | None, mask_dtype: str, shift_mean: bool, eps: float,
    out: _Data, workspace: _Data, device: int, stream: int, group: _Data | None = None,
) -> None: ...
def token_gae(
    R: int, C: int, dtype: str, rewards: _Strided2, values: _Strided2, last: _Strided1, gamma: float, lam: float,
    adv: _Data, ret: _Data, device: int, stream: int,
) -> None: ...

# The environment step (csrc/bindings_env_step.cpp): the running state arrays are held by address
# and updated in place. Steps given to bind_rollout are in bytes.
class EnvStepper:
    def __init__(
        self, N: int, obs_dim: int, normalize_obs: bool, normalize_reward: bool, gamma: float, clip: float,
        obs_count: np.ndarray, obs_mean: np.ndarray, obs_m2: np.ndarray, return_count: np.ndarray,
        return_mean: np.ndarray, return_m2: np.ndarray, discounted_return: np.ndarray, episode_return: np.ndarray,
        episode_length: np.ndarray, previous_done: np.ndarray, finished_return: np.ndarray,
        finished_length: np.ndarray, finished: np.ndarray,
    ) -> None: ...
    def defer_stats(
        self, obs_count: np.ndarray, obs_mean: np.ndarray, obs_m2: np.ndarray, return_count: np.ndarray,
        return_mean: np.ndarray, return_m2: np.ndarray,
    ) -> None: ...
    def step(
        self, rows: int, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
        episode_reward: np.ndarray, episode_over: np.ndarray | None, update_stats: bool, obs_out: np.ndarray,
        reward_out: np.ndarray, done_out: np.ndarray, terminated_out: np.ndarray, real_out: np.ndarray,
        env_ids: np.ndarray | None,
    ) -> int: ...
    def bind_rollout(
        self, obs_out: int, obs_step: int, obs_like: np.ndarray, reward_out: int, reward_step: int, done_out: int,
        done_step: int, terminated_out: int, terminated_step: int, real_out: int, real_step: int,
    ) -> None: ...
    def step_at(
        self, t: int, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
    ) -> int: ...

# The fused actor-critic (csrc/bindings_actor_critic.cpp). A layer is
# (weight, bias, grad_weight, grad_bias, in_features, out_features); addresses are ints, 0 = none.
_Layer = tuple[int, int, int, int, int, int]

def mlp_forward(
    dtype: str, layers: Sequence[_Layer], activation: str, last_linear: bool, rows: int, x: int, ldx: int, saved: int,
) -> None: ...
def mlp_backward(
    dtype: str, layers: Sequence[_Layer], activation: str, last_linear: bool, rows: int, x: int, ldx: int, saved: int,
    grad_out: int, grad_x: int,
) -> None: ...

# The LSTM over time (csrc/bindings_rnn.cpp); an LSTM of the actor-critic is
# (w_ih, w_hh, b_ih, b_hh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, input_size, hidden_size).
_Lstm = tuple[int, int, int, int, int, int, int, int, int, int]

def lstm_saved_size(rows: int, H: int) -> int: ...
def lstm_forward(
    dtype: str, T: int, n: int, F: int, H: int, x: int, ldx: int, starts: int, h0: int, c0: int, w_ih: int,
    w_hh: int, b_ih: int, b_hh: int, out: int, h_n: int, c_n: int, saved: int,
) -> None: ...
def lstm_backward(
    dtype: str, T: int, n: int, F: int, H: int, x: int, ldx: int, starts: int, w_ih: int, w_hh: int, saved: int,
    grad_out: int, grad_h_n: int, grad_c_n: int, grad_x: int, grad_h0: int, grad_c0: int, grad_w_ih: int,
    grad_w_hh: int, grad_b_ih: int, grad_b_hh: int,
) -> None: ...

class ActorCriticPlan:
    def __init__(
        self, dtype: str, activation: str, trunk: Sequence[_Layer], actor: Sequence[_Layer], critic: Sequence[_Layer],
        continuous: bool, log_std: int, grad_log_std: int, params: int, grads: int, exp_avg: int,
        exp_avg_sq: int, n_params: int, squashed: bool = False, nvec: Sequence[int] = (),
        rnn: Sequence[_Lstm] = (),
    ) -> None: ...
    @property
    def obs_dim(self) -> int: ...
    @property
    def n_out(self) -> int: ...
    @property
    def n_components(self) -> int: ...
    def act(
        self, rows: int, obs: int, ldobs: int, noise: int, action: int, logprob: int, value: int, env_action: int,
        low: int, high: int, mask: int = 0, state: int = 0, starts: int = 0,
    ) -> None: ...
    def refresh(self) -> None: ...
    def bind_rollout(
        self, rows: int, obs: int, obs_step: int, noise: int, noise_step: int, action: int, action_step: int,
        logprob: int, logprob_step: int, value: int, value_step: int, env_action: int, env_action_step: int,
        low: int, high: int, T: int, mask: int = 0, mask_step: int = 0, state: int = 0, starts: int = 0,
        starts_step: int = 0,
    ) -> None: ...
    def act_step(self, t: int) -> None: ...
    def set_batch(
        self, obs: int, actions: int, old_logprob: int, advantages: int, returns: int, old_values: int, mask: int,
        action_mask: int = 0,
    ) -> None: ...
    def set_sequences(self, T: int, N: int, starts: int, state: int) -> None: ...
    def set_options(
        self, clip_coef: float, vf_coef: float, ent_coef: float, vf_clip_coef: float, clip_vloss: bool,
        norm_adv: bool, max_grad_norm: float, beta1: float, beta2: float, eps: float,
    ) -> None: ...
    def update(
        self, M: int, idx: int, lr: float, step: int, stats: int, group: int = 0, group_size: float = 1.0,
        apply_step: bool = True,
    ) -> None: ...
    def apply(self, lr: float, step: int, stats: int) -> None: ...
