"""The kernels RLHF adds to PPO, over ``[B, T]`` token tensors (B responses of T tokens).

- :func:`kl_penalty_rewards`: per-token KL estimate against the reference policy and the shaped
  rewards ``-beta * kl``, with each response's score added at its last real token; one pass.
- :func:`masked_whiten`: whitening with the mean and variance of the selected tokens only.
- :func:`token_gae`: GAE over each response's tokens (gamma 1, gae_lambda 0.95 by default), a response's
  last real token ending its episode; one backward sweep per row over contiguous tokens.
- :func:`masked_mean`: a mean over selected tokens (a plain torch helper for metrics).

None of them is differentiable: they prepare the data the PPO update reads. All run on the CPU and
on CUDA (on the current stream), take float32 or float64 and any strided ``[B, T]`` view, and
never synchronize with the host.

bfloat16 / float16 inputs (every float input of a call in one dtype) are widened to float32 in
Python (exact), the float32 kernel runs, and the float outputs are rounded once to the input dtype
(so within one rounding of it, a relative 2^-8 for bfloat16 and 2^-11 for float16, of the float64
result on the same inputs); statistics (``masked_whiten``'s mean and variance) stay float64.
These are per-token kernels: the float32 copies are ``[B, T]`` each.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _C
from .. import _buffers as B
from .._deprecation import renamed_keywords

KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2}


def _check_rows(fn: str, name: str, x) -> None:
    """``x`` must be a ``[B, T]`` float tensor on a device fastppo runs on."""
    B.require_array(fn, name, x, "torch", B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape [B, T], got {tuple(x.shape)}")
    B.check_device(fn, name, x)


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
        logprob: ``[B, T]`` float32/float64 (bfloat16/float16 through float32, see the module): log pi(token) of the sampled response tokens under the
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
    _check_rows(fn, "logprob", logprob)
    B.require_like(fn, "ref_logprob", ref_logprob, logprob, "logprob")
    if mask is not None:
        B.require_like(fn, "mask", mask, logprob, "logprob", B.FLAG_DTYPES)
    if scores is not None:
        B.require_like(fn, "scores", scores, logprob, "logprob", shape=logprob.shape[:1],
                       shape_what="one score per response")
    beta = B.require_real(fn, "beta", beta, "a finite number >= 0", 0.0)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{fn}: estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    clamp = 0.0 if kl_clamp is None else B.require_real(fn, "kl_clamp", kl_clamp, "None or a number > 0", 0.0,
                                                         open_low=True, finite=False)
    if B.is_low_precision(logprob):
        out = kl_penalty_rewards(logprob.float(), ref_logprob.float(), mask, B.widen(scores), beta, estimator, kl_clamp)
        return ShapedRewards(out.rewards.to(logprob.dtype), out.kl.to(logprob.dtype), out.last_index)
    R, T = logprob.shape
    rewards = torch.empty((R, T), dtype=logprob.dtype, device=logprob.device)
    kl = torch.empty_like(rewards)
    last = torch.empty(R, dtype=torch.int64, device=logprob.device)
    _C.kl_rewards(
        R, T, B.DTYPE_NAMES[logprob.dtype], B.spec(logprob), B.spec(ref_logprob), B.spec(mask),
        "" if mask is None else B.DTYPE_NAMES[mask.dtype], B.spec(scores), beta, KL_ESTIMATORS[estimator], clamp,
        rewards.data_ptr(), kl.data_ptr(), last.data_ptr(), *B.device_stream(logprob),
    )
    return ShapedRewards(rewards, kl, last)


def masked_whiten(x: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8,
                  group_moments: Optional[Tensor] = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of the selected elements.

    Args:
        x: ``[B, T]`` float32/float64 (advantages or rewards of response tokens); bfloat16/float16
            through float32 (see the module), the statistics in float64 all the same.
        mask: optional ``[B, T]`` bool or 0/1; all elements when None.
        shift_mean: when False the mean is added back (only the scale changes), as for rewards.
        eps: added to the variance.
        group_moments: data-parallel training: float64 ``[3]`` (count, mean, m2) of the selected
            elements of the whole group's batch (``fastppo.distributed.Group.advantage_moments``),
            used instead of this call's own, so every rank whitens as one process would the union.

    Returns:
        ``[B, T]`` of ``x``'s dtype, 0 at unselected elements. With fewer than two selected elements
        the variance is taken as 0 (an unbiased variance needs two). The statistics are reduced in
        a fixed order, so the result is the same bits run after run, on the CPU and on CUDA.
    """
    fn = "fastppo.rlhf.masked_whiten"
    _check_rows(fn, "x", x)
    if mask is not None:
        B.require_like(fn, "mask", mask, x, "x", B.FLAG_DTYPES)
    eps = B.require_real(fn, "eps", eps, "a finite number >= 0", 0.0)
    if group_moments is not None:
        B.require_array(fn, "group_moments", group_moments, "torch", ("float64",))
        if tuple(group_moments.shape) != (3,) or group_moments.device != x.device:
            raise ValueError(f"{fn}: group_moments must be a float64 [3] tensor on {x.device}, got shape "
                             f"{tuple(group_moments.shape)} on {group_moments.device}")
        group_moments = group_moments.contiguous()
    if B.is_low_precision(x):
        return masked_whiten(x.float(), mask, shift_mean, eps, group_moments).to(x.dtype)
    R, T = x.shape
    out = torch.empty((R, T), dtype=x.dtype, device=x.device)
    workspace = torch.empty(_C.masked_whiten_workspace(R, T), dtype=torch.float64, device=x.device)
    _C.masked_whiten(
        R, T, B.DTYPE_NAMES[x.dtype], B.spec(x), B.spec(mask), "" if mask is None else B.DTYPE_NAMES[mask.dtype],
        bool(shift_mean), eps, out.data_ptr(), workspace.data_ptr(), *B.device_stream(x),
        None if group_moments is None else group_moments.data_ptr(),
    )
    return out


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over the selected elements (all of them, or along ``dim``); 0 where none is.

    ``x`` is a floating-point tensor; ``mask`` (optional) has its shape and device, bool or 0/1 (any
    nonzero value selects, it is not a weight). An unselected element is not read into the sum, so
    NaN or inf in padding (a log-ratio's ``exp()`` there) does not reach the mean.
    """
    fn = "fastppo.rlhf.masked_mean"
    B.require_array(fn, "x", x, "torch")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x has dtype {x.dtype}; expected a floating-point dtype")
    if mask is None:
        count = x.numel() if dim is None else x.shape[dim]
        return (x.sum() if dim is None else x.sum(dim)) / max(count, 1)
    B.require_like(fn, "mask", mask, x, "x", B.FLAG_DTYPES)
    selected = mask != 0
    chosen = torch.where(selected, x, x.new_zeros(()))
    total = chosen.sum() if dim is None else chosen.sum(dim)
    count = selected.sum() if dim is None else selected.sum(dim)
    return total / count.clamp(min=1)


@renamed_keywords("fastppo.rlhf.token_gae", lam="gae_lambda")
def token_gae(
    rewards: Tensor, values: Tensor, last_index: Tensor, gamma: float = 1.0, gae_lambda: float = 0.95,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """GAE over response tokens: each response is one episode that ends at its last real token.

    Args:
        rewards: ``[B, T]`` float32/float64 token rewards (from :func:`kl_penalty_rewards`);
            bfloat16/float16 through float32 (see the module).
        values: like ``rewards``: the value model's estimate before each token.
        last_index: ``[B]`` int64: each response's last real token (-1: none; an index past the
            end counts as T - 1), as returned by :func:`kl_penalty_rewards`. Positions after it are
            padding: they are never read, and come back as 0.
        gamma: the discount (RLHF uses 1).
        gae_lambda: GAE's lambda (RLHF uses 0.95). ``lam``, its name before, still works this release
            with a DeprecationWarning.
        mask: optional ``[B, T]`` real-token mask; when given the outputs are 0 outside it.

    Returns:
        ``(advantages, returns)``, each ``[B, T]``; ``returns = advantages + values`` at real tokens.
        Equal to running GAE on each response on its own, with no bootstrap after its last token.
    """
    fn = "fastppo.rlhf.token_gae"
    _check_rows(fn, "rewards", rewards)
    B.require_like(fn, "values", values, rewards, "rewards")
    B.require_like(fn, "last_index", last_index, rewards, "rewards", ("int64",), rewards.shape[:1],
                   "one index per row of rewards")
    gamma = B.require_real(fn, "gamma", gamma, "a number in [0, 1]", 0.0, 1.0)
    gae_lambda = B.require_real(fn, "gae_lambda", gae_lambda, "a number in [0, 1]", 0.0, 1.0)
    if mask is not None:
        B.require_like(fn, "mask", mask, rewards, "rewards", B.FLAG_DTYPES)
    if B.is_low_precision(rewards):
        adv, ret = token_gae(rewards.float(), values.float(), last_index, gamma, gae_lambda, mask)
        return adv.to(rewards.dtype), ret.to(rewards.dtype)
    R, T = rewards.shape
    adv = torch.empty((R, T), dtype=rewards.dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    _C.token_gae(R, T, B.DTYPE_NAMES[rewards.dtype], B.spec(rewards), B.spec(values), B.spec(last_index),
                 gamma, gae_lambda, adv.data_ptr(), ret.data_ptr(), *B.device_stream(rewards))
    if mask is not None:
        zero = adv.new_zeros(())
        adv, ret = torch.where(mask.bool(), adv, zero), torch.where(mask.bool(), ret, zero)
    return adv, ret
