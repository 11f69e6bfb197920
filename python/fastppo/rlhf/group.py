"""Critic-free advantages from one score per response, relative to the other responses to its prompt.

GRPO, Dr. GRPO and RLOO sample a group of responses to each prompt and take each response's
advantage from its score and the scores of its group, with no value model. The batch holds the
groups one after the other (TRL's layout): rows ``k * group_size`` to ``(k + 1) * group_size - 1``
are the responses to prompt k.

This is plain torch (a few reductions over ``[B / group_size, group_size]``), not a kernel of its
own: it runs wherever the scores are, never synchronizes with the host and traces whole under
``torch.compile``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import _buffers as B

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")
_NUMPY_DTYPES = ("float16", "float32", "float64")

Array = Union[Tensor, np.ndarray]


def group_advantages(scores: Array, group_size: int, estimator: str = "grpo", eps: float = 1e-6,
                     mask: Optional[Array] = None) -> Array:
    """Each response's advantage from its score and the scores of its group.

    With ``r`` the ``g = group_size`` scores of one group, ``mean(r)`` their mean and ``std(r)``
    their unbiased standard deviation (divisor ``g - 1``, as ``torch.std``):

    - ``"grpo"``: ``(r_i - mean(r)) / (std(r) + eps)`` (Shao et al. 2024). TRL's ``GRPOTrainer``
      with ``scale_rewards="group"`` (its default; ``True`` too) computes this with ``eps = 1e-4``,
      a constant of its code: pass ``eps=1e-4`` for its numbers.
    - ``"dr_grpo"``: ``r_i - mean(r)``, no division (Dr. GRPO, Liu et al. 2025): TRL's
      ``GRPOTrainer`` with ``scale_rewards="none"`` (``False`` too).
    - ``"rloo"``: ``r_i`` minus the mean of the group's other ``g - 1`` scores, which is
      ``g / (g - 1) * (r_i - mean(r))`` (Ahmadian et al. 2024): TRL's ``RLOOTrainer`` with
      ``normalize_advantages=False`` (its default). Its ``beta`` > 0 folds ``-beta * KL`` of each
      response into the reward first: pass those shaped scores to get its numbers. Needs
      ``group_size >= 2``.

    A group of equal scores gets advantages exactly 0, never NaN, whatever ``eps`` (the deviations
    are taken from the group's first score, so they are exact zeros; ``0 / 0`` is defined as 0).
    With ``group_size`` 1 the unbiased std is 0/0 (``torch.std`` gives NaN); it is taken as 0 here,
    so ``"grpo"`` and ``"dr_grpo"`` give 0 for every response (as TRL does).
    A NaN score makes every advantage of its group NaN (an infinite one makes them NaN or infinite)
    and leaves the other groups as they are. (TRL instead leaves a NaN reward, "unscorable", out of
    its group's statistics and gives it 0: map such scores first if that is what you want.)

    Args:
        scores: ``[B]`` torch tensor (any device; float16, bfloat16, float32 or float64) or numpy
            array (float16, float32 or float64): one score per response, as ``B / group_size``
            consecutive groups.
        group_size: responses per prompt, ``g >= 1``; must divide B.
        estimator: ``"grpo"``, ``"dr_grpo"`` or ``"rloo"``.
        eps: added to the group's std by ``"grpo"`` (a finite number >= 0).
        mask: optional ``[B, T]`` bool or 0/1 (any ``[B, ...]``), of ``scores``' kind and device:
            the response tokens. Given, the result is per token: ``[B, T]`` with the advantage of
            response b at its selected tokens and 0 elsewhere (also where it is NaN), which is the
            ``advantages`` argument a token-level loss such as :func:`fastppo.ppo_loss` takes.

    Returns:
        ``[B]`` (``mask``'s shape with a mask), of ``scores``' kind, dtype and device. float16 and
        bfloat16 scores are computed in float32 and rounded once at the end; float32 in float32,
        float64 in float64.

    Raises:
        TypeError: ``scores`` or ``mask`` not an array or of another dtype, ``group_size`` not an integer.
        ValueError: shapes, a ``group_size`` < 1 or that does not divide B, an unknown ``estimator``,
            ``"rloo"`` with ``group_size`` 1, a negative or non-finite ``eps``, ``mask`` on another device.
    """
    fn = "fastppo.rlhf.group_advantages"
    kind = B.require_array(fn, "scores", scores, None, _TORCH_DTYPES if B.kind_of(scores) == "torch" else _NUMPY_DTYPES)
    if scores.ndim != 1:
        raise ValueError(f"{fn}: scores must have shape [B] (one score per response), got {tuple(scores.shape)}")
    g = _group_size(fn, group_size)
    n = scores.shape[0]
    if n % g:
        raise ValueError(f"{fn}: group_size {g} does not divide the number of scores B = {n}: scores must hold "
                         f"whole groups of group_size consecutive responses")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{fn}: estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    if estimator == "rloo" and g < 2:
        raise ValueError(f"{fn}: estimator 'rloo' needs group_size >= 2 (its baseline is the mean of the other "
                         f"responses of the group), got group_size {g}")
    eps = B.require_real(fn, "eps", eps, "a finite number >= 0", 0.0)
    if mask is not None:
        B.require_array(fn, "mask", mask, kind, B.FLAG_DTYPES)
        if mask.ndim < 1 or mask.shape[0] != n:
            raise ValueError(f"{fn}: mask has shape {tuple(mask.shape)}; expected [B, T] with B = {n}, the number "
                             "of scores")
        if kind == "torch" and mask.device != scores.device:
            raise ValueError(f"{fn}: mask is on {mask.device} but scores is on {scores.device}; expected one device")

    if kind == "numpy":  # a copy: the scores are B numbers, and torch.from_numpy wants a writable native array
        x = torch.from_numpy(np.array(scores, dtype=scores.dtype.newbyteorder("="), copy=True))
    else:
        x = scores
    adv = _advantages(x, g, estimator, eps).to(x.dtype)
    if mask is not None:
        selected = torch.from_numpy(np.asarray(mask) != 0) if kind == "numpy" else (
            mask if mask.dtype == torch.bool else mask != 0)
        adv = torch.where(selected, adv.reshape((n,) + (1,) * (selected.ndim - 1)), adv.new_zeros(()))
    return adv.numpy() if kind == "numpy" else adv


def _group_size(fn: str, group_size) -> int:
    """``group_size`` as an int >= 1 (a Python or numpy integer, not a bool)."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"{fn}: group_size must be an integer >= 1, got {type(group_size).__name__} {group_size!r}")
    g = int(group_size)
    if g < 1:
        raise ValueError(f"{fn}: group_size must be an integer >= 1, got {g}")
    return g


def _advantages(x: Tensor, g: int, estimator: str, eps: float) -> Tensor:
    """The ``[B]`` advantages of the scores ``x`` in float32 (float64 for float64 scores)."""
    r = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(x.shape[0] // g, g)
    # Deviations from the group's first score, then from their mean: r - mean(r), with equal scores
    # giving exact zeros (a mean of equal numbers need not round back to them) and less cancellation
    # for scores far from 0.
    d = r - r[:, :1]
    dev = d - d.mean(1, keepdim=True)
    if estimator == "dr_grpo":
        adv = dev
    elif estimator == "rloo":  # r_i - (sum(r) - r_i) / (g - 1)
        adv = dev * (g / (g - 1))
    else:
        std = (dev.square().sum(1, keepdim=True) / max(g - 1, 1)).sqrt()  # group_size 1: 0, not 0/0
        denom = std + eps
        adv = torch.where(denom == 0, dev.new_zeros(()), dev / denom)  # 0 only where every deviation is 0
    return adv.reshape(-1)
