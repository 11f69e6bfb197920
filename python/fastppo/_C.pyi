# Typed stub of the compiled core (csrc/bindings.cpp). Strides are in elements; a buffer's data
# is an integer address or a numpy array (whose address is read in C++).
from typing import Any, Union

import numpy as np

Data = Union[int, np.ndarray]

__version__: str
WITH_CUDA: bool

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def gae(
    T: int,
    N: int,
    dtype: str,
    rewards: tuple[Data, int, int],
    values: tuple[Data, int, int],
    dones: tuple[Data, int, int],
    dones_dtype: str,
    terminated: tuple[Data, int, int],
    terminated_dtype: str,
    last_value: tuple[Data, int],
    adv: Data,
    ret: Data,
    gamma: float,
    lam: float,
    device: int,
    stream: int,
) -> None: ...

LOSS_CHUNK: int
LOSS_SUMS: int
LOSS_STATS: int

def ppo_loss(
    R: int,
    C: int,
    dtype: str,
    new_logprob: tuple[Data, int, int],
    old_logprob: tuple[Data, int, int],
    advantages: tuple[Data, int, int],
    new_value: tuple[Data, int, int] | None,
    old_value: tuple[Data, int, int] | None,
    returns: tuple[Data, int, int] | None,
    entropy: tuple[Data, int, int] | None,
    mask: tuple[Data, int, int] | None,
    mask_dtype: str,
    clip_coef: float,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float,
    dual_clip: float,
    clip_vloss: bool,
    norm_adv: bool,
    agg: int,
    grad_logprob: Data,
    grad_value: Data | None,
    loss: Data,
    stats: Data,
    row_scale: Data,
    partials: Data,
    adv_stats: Data,
    device: int,
    stream: int,
) -> None: ...

WHITEN_CHUNK: int

def kl_rewards(
    R: int,
    C: int,
    dtype: str,
    logprob: tuple[Data, int, int],
    ref_logprob: tuple[Data, int, int],
    mask: tuple[Data, int, int] | None,
    mask_dtype: str,
    scores: tuple[Data, int] | None,
    beta: float,
    estimator: int,
    clamp: float,
    rewards: Data,
    kl: Data,
    last: Data,
    device: int,
    stream: int,
) -> None: ...
def masked_whiten(
    R: int,
    C: int,
    dtype: str,
    x: tuple[Data, int, int],
    mask: tuple[Data, int, int] | None,
    mask_dtype: str,
    shift_mean: bool,
    eps: float,
    out: Data,
    partials: Data,
    stats: Data,
    device: int,
    stream: int,
) -> None: ...
def token_gae(
    R: int,
    C: int,
    dtype: str,
    rewards: tuple[Data, int, int],
    values: tuple[Data, int, int],
    last: tuple[Data, int],
    gamma: float,
    lam: float,
    adv: Data,
    ret: Data,
    device: int,
    stream: int,
) -> None: ...

# Policy heads (csrc/heads.h). logits: (data, row stride, column stride); actions: (data, stride).
NORMAL_CHUNK: int

def categorical_forward(
    rows: int, A: int, dtype: str, logits: tuple[Data, int, int], actions: tuple[Data, int], actions_dtype: str,
    temperature: float, logprob: Data, entropy: Data, lse: Data, device: int, stream: int,
) -> None: ...
def categorical_sample(
    rows: int, A: int, dtype: str, logits: tuple[Data, int, int], noise: int, noise_sr: int, temperature: float,
    actions: int, logprob: Data, entropy: Data, lse: Data,
) -> None: ...
def categorical_backward(
    rows: int, A: int, dtype: str, logits: tuple[Data, int, int], actions: tuple[Data, int], actions_dtype: str,
    temperature: float, lse: Data, entropy: Data, grad_logprob: tuple[Data, int] | None,
    grad_entropy: tuple[Data, int] | None, grad_logits: Data, device: int, stream: int,
) -> None: ...

# The fused actor-critic (csrc/mlp.h, csrc/bindings_mlp.cpp). A layer is
# (weight, bias, grad_weight, grad_bias, in_features, out_features); addresses are ints, 0 = none.
Layer = tuple[int, int, int, int, int, int]

def mlp_forward(
    dtype: str, layers: list[Layer], activation: str, last_linear: bool, rows: int, x: int, ldx: int, saved: int,
) -> None: ...
def mlp_backward(
    dtype: str, layers: list[Layer], activation: str, last_linear: bool, rows: int, x: int, ldx: int, saved: int,
    grad_out: int, grad_x: int,
) -> None: ...

class ActorCriticPlan:
    def __init__(
        self, dtype: str, activation: str, trunk: list[Layer], actor: list[Layer], critic: list[Layer],
        continuous: bool, log_std: int, grad_log_std: int, params: int, grads: int, exp_avg: int,
        exp_avg_sq: int, n_params: int,
    ) -> None: ...
    @property
    def obs_dim(self) -> int: ...
    @property
    def n_out(self) -> int: ...
    def act(
        self, rows: int, obs: int, ldobs: int, noise: int, action: int, logprob: int, value: int, env_action: int,
        low: int, high: int,
    ) -> None: ...
    def refresh(self) -> None: ...
    def bind_rollout(
        self, rows: int, obs: int, obs_step: int, noise: int, noise_step: int, action: int, action_step: int,
        logprob: int, logprob_step: int, value: int, value_step: int, env_action: int, env_action_step: int,
        low: int, high: int, T: int,
    ) -> None: ...
    def act_step(self, t: int) -> None: ...
    def set_batch(
        self, obs: int, actions: int, old_logprob: int, advantages: int, returns: int, old_values: int, mask: int,
    ) -> None: ...
    def set_options(
        self, clip_coef: float, vf_coef: float, ent_coef: float, vf_clip_coef: float, clip_vloss: bool,
        norm_adv: bool, max_grad_norm: float, beta1: float, beta2: float, eps: float,
    ) -> None: ...
    def update(self, M: int, idx: int, lr: float, step: int, stats: int) -> None: ...
