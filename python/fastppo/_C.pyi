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
