"""The kernels RLHF adds to PPO, over ``[B, T]`` token tensors (B responses of T tokens).

- :func:`kl_penalty_rewards`: per-token KL estimate against the reference policy and the shaped
  rewards ``-beta * kl``, with each response's score added at its last real token; one pass.
- :func:`masked_whiten`: whitening with the mean and variance of the selected tokens only.
- :func:`token_gae`: GAE over each response's tokens (gamma 1, lam 0.95 by default), a response's
  last real token ending its episode; one backward sweep per row over contiguous tokens.
- :func:`masked_mean`: a mean over selected tokens (a plain torch helper for metrics).

None of them is differentiable: they prepare the data the PPO update reads. All run on the CPU and
on CUDA (on the current stream), take float32 or float64 and any strided ``[B, T]`` view, and
never synchronize with the host.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _C
from .._buffers import require_unit_interval

KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2}
_FLOATS = (torch.float32, torch.float64)
_FLAGS = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64)
_NAMES = {d: str(d).removeprefix("torch.") for d in _FLAGS}


def _device_args(fn: str, x: Tensor):
    if x.device.type == "cuda":
        if not _C.WITH_CUDA:
            raise ValueError(f"{fn}: the tensors are on {x.device} but this build of fastppo has no CUDA support")
        return x.device.index, torch.cuda.current_stream(x.device).cuda_stream
    if x.device.type != "cpu":
        raise ValueError(f"{fn}: the tensors are on {x.device}; fastppo runs on cpu and cuda devices")
    return -1, 0


def _check_2d(fn: str, name: str, x, like: Optional[Tensor] = None, flags: bool = False) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if like is None:
        if x.dim() != 2:
            raise ValueError(f"{fn}: {name} must have shape [B, T], got {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected torch.float32 or torch.float64")
        return
    if flags and x.dtype not in _FLAGS:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected bool, or 0/1 as an integer or float dtype")
    if not flags and x.dtype != like.dtype:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected {like.dtype}, the dtype of the first argument")
    if x.shape != like.shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(like.shape)}")
    if x.device != like.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but the first argument is on {like.device}; expected one device")


def _spec(x: Optional[Tensor]):
    return None if x is None else (x.data_ptr(), x.stride(0), x.stride(1))


class ShapedRewards(NamedTuple):
    """Output of :func:`kl_penalty_rewards`."""

    rewards: Tensor  # [B, T]: -beta * kl, plus the score at the last real token; 0 at padding
    kl: Tensor  # [B, T]: the per-token KL estimate (clamped); 0 at padding
    last_index: Tensor  # [B] int64: each response's last real token, -1 for a response with none


def kl_penalty_rewards(
    logprob: Tensor,
    ref_logprob: Tensor,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    beta: float = 0.05,
    estimator: str = "k1",
    kl_clamp: Optional[float] = None,
) -> ShapedRewards:
    """Per-token KL penalty against the reference model, shaped into token rewards, in one pass.

    With ``d = logprob - ref_logprob`` for each sampled token, the KL estimate is ``k1 = d``,
    ``k2 = d**2 / 2`` or ``k3 = exp(-d) - 1 + d`` (Schulman 2020), clamped to
    ``[-kl_clamp, kl_clamp]`` when ``kl_clamp`` is given. The reward of token t is
    ``-beta * kl_t``, and ``scores[b]`` is added at response b's last selected token.

    Args:
        logprob: ``[B, T]`` float32/float64: log pi(token) of the sampled response tokens under the
            policy that sampled them (with the sampling temperature).
        ref_logprob: like ``logprob``: the same tokens under the frozen reference model.
        mask: optional ``[B, T]`` bool or 0/1: the real tokens of each response (a prefix of the row
            in the usual right-padded layout). Padding gets kl 0 and reward 0 whatever its log-probs.
        scores: optional ``[B]`` of ``logprob``'s dtype: the reward model's score of each response.
        beta: the KL coefficient (>= 0).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        kl_clamp: optional bound > 0 on each token's estimate.

    Returns:
        :class:`ShapedRewards` ``(rewards [B, T], kl [B, T], last_index [B] int64)``. A response with
        no selected token has ``last_index`` -1 and its score is not added.
    """
    fn = "fastppo.rlhf.kl_penalty_rewards"
    _check_2d(fn, "logprob", logprob)
    _check_2d(fn, "ref_logprob", ref_logprob, logprob)
    if mask is not None:
        _check_2d(fn, "mask", mask, logprob, flags=True)
    if scores is not None:
        if not isinstance(scores, Tensor):
            raise TypeError(f"{fn}: scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.shape != logprob.shape[:1] or scores.dtype != logprob.dtype or scores.device != logprob.device:
            raise ValueError(
                f"{fn}: scores is {tuple(scores.shape)} {scores.dtype} on {scores.device}; expected "
                f"({logprob.shape[0]},) {logprob.dtype} on {logprob.device}, one score per response"
            )
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0.0 <= float(beta) < float("inf")):
        raise ValueError(f"{fn}: beta must be a finite number >= 0, got {beta!r}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{fn}: estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    if kl_clamp is not None and (isinstance(kl_clamp, bool) or not isinstance(kl_clamp, numbers.Real) or not kl_clamp > 0):
        raise ValueError(f"{fn}: kl_clamp must be None or a number > 0, got {kl_clamp!r}")
    device, stream = _device_args(fn, logprob)
    B, T = logprob.shape
    rewards = torch.empty((B, T), dtype=logprob.dtype, device=logprob.device)
    kl = torch.empty_like(rewards)
    last = torch.empty(B, dtype=torch.int64, device=logprob.device)
    _C.kl_rewards(
        B, T, _NAMES[logprob.dtype], _spec(logprob), _spec(ref_logprob), _spec(mask),
        "" if mask is None else _NAMES[mask.dtype],
        None if scores is None else (scores.data_ptr(), scores.stride(0)),
        float(beta), KL_ESTIMATORS[estimator], 0.0 if kl_clamp is None else float(kl_clamp),
        rewards.data_ptr(), kl.data_ptr(), last.data_ptr(), device, stream,
    )
    return ShapedRewards(rewards, kl, last)


def masked_whiten(x: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of the selected elements.

    Args:
        x: ``[B, T]`` float32/float64 (advantages or rewards of response tokens).
        mask: optional ``[B, T]`` bool or 0/1; all elements when None.
        shift_mean: when False the mean is added back (only the scale changes), as for rewards.
        eps: added to the variance.

    Returns:
        ``[B, T]`` of ``x``'s dtype, 0 at unselected elements. With fewer than two selected elements
        the variance is taken as 0 (an unbiased variance needs two). The statistics are reduced in
        a fixed order, so the result is the same bits run after run, on the CPU and on CUDA.
    """
    fn = "fastppo.rlhf.masked_whiten"
    _check_2d(fn, "x", x)
    if mask is not None:
        _check_2d(fn, "mask", mask, x, flags=True)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= float(eps) < float("inf")):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    device, stream = _device_args(fn, x)
    B, T = x.shape
    out = torch.empty((B, T), dtype=x.dtype, device=x.device)
    workspace = torch.empty(_C.masked_whiten_workspace(B, T), dtype=torch.float64, device=x.device)
    _C.masked_whiten(
        B, T, _NAMES[x.dtype], _spec(x), _spec(mask), "" if mask is None else _NAMES[mask.dtype],
        bool(shift_mean), float(eps), out.data_ptr(), workspace.data_ptr(), device, stream,
    )
    return out


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over the selected elements (all of them, or along ``dim``); 0 where none is."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    m = mask.to(x.dtype)
    total = (x * m).sum() if dim is None else (x * m).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def token_gae(
    rewards: Tensor, values: Tensor, last_index: Tensor, gamma: float = 1.0, lam: float = 0.95,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """GAE over response tokens: each response is one episode that ends at its last real token.

    Args:
        rewards: ``[B, T]`` float32/float64 token rewards (from :func:`kl_penalty_rewards`).
        values: like ``rewards``: the value model's estimate before each token.
        last_index: ``[B]`` int64: each response's last real token (-1: none; an index past the
            end counts as T - 1), as returned by :func:`kl_penalty_rewards`. Positions after it are
            padding: they are never read, and come back as 0.
        gamma, lam: discount and GAE lambda (RLHF uses gamma 1, lam 0.95).
        mask: optional ``[B, T]`` real-token mask; when given the outputs are 0 outside it.

    Returns:
        ``(advantages, returns)``, each ``[B, T]``; ``returns = advantages + values`` at real tokens.
        Equal to running GAE on each response on its own, with no bootstrap after its last token.
    """
    fn = "fastppo.rlhf.token_gae"
    _check_2d(fn, "rewards", rewards)
    _check_2d(fn, "values", values, rewards)
    if not isinstance(last_index, Tensor) or last_index.shape != rewards.shape[:1] or last_index.dtype != torch.int64:
        raise ValueError(
            f"{fn}: last_index must be an int64 tensor of shape ({rewards.shape[0]},), got "
            f"{type(last_index).__name__} {getattr(last_index, 'shape', '')} {getattr(last_index, 'dtype', '')}"
        )
    if last_index.device != rewards.device:
        raise ValueError(f"{fn}: last_index is on {last_index.device} but rewards is on {rewards.device}; expected one device")
    gamma = require_unit_interval(fn, "gamma", gamma)
    lam = require_unit_interval(fn, "lam", lam)
    if mask is not None:
        _check_2d(fn, "mask", mask, rewards, flags=True)
    device, stream = _device_args(fn, rewards)
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    _C.token_gae(B, T, _NAMES[rewards.dtype], _spec(rewards), _spec(values), (last_index.data_ptr(), last_index.stride(0)),
                 gamma, lam, adv.data_ptr(), ret.data_ptr(), device, stream)
    if mask is not None:
        zero = adv.new_zeros(())
        adv, ret = torch.where(mask.bool(), adv, zero), torch.where(mask.bool(), ret, zero)
    return adv, ret
