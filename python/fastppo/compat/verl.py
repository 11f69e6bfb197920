"""verl's log-prob, entropy and PPO policy-loss functions on fastppo's kernels: change one import.

    from verl.trainer.ppo.core_algos import compute_policy_loss, agg_loss     # before
    from fastppo.compat.verl import compute_policy_loss, agg_loss             # after

Written from verl at commit b178a3c (January 2026, version 0.8.0.dev): ``logprobs_from_logits`` and
``entropy_from_logits`` of ``verl/utils/torch_functional.py``; ``compute_policy_loss`` (the
argument-list form), ``compute_policy_loss_vanilla`` (the registered ``"vanilla"`` loss, settings
from the actor config) and ``agg_loss`` of ``verl/trainer/ppo/core_algos.py``. verl itself is not
imported. Shapes, dtypes and returned values (and gradients) are verl's; where
:func:`fastppo.ppo_loss` defines a detail differently, verl's definition is kept, as each function's
docstring says.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _heads as H
from .. import _buffers as B
from ..loss import ppo_loss

__all__ = ["agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "entropy_from_logits",
           "logprobs_and_entropy_from_logits", "logprobs_from_logits"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_LOG_RATIO_BOUND = 20.0  # verl clamps log pi_new - log pi_old to [-20, 20] before exp


# ------------------------------------------------------------------ log-probs and entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """``log_softmax(logits, -1)`` at ``labels``: ``logits [..., V]`` float32/float64/bfloat16/float16
    (differentiable, any strides), ``labels [...]`` int64/int32 in ``[0, V)``; returns ``[...]`` in
    the logits' dtype.

    One fused pass of :func:`fastppo.categorical_logprob_entropy`. ``inplace_backward`` is taken for
    verl's signature: verl passes it to flash-attn's cross-entropy, which may write the gradient into
    the logits' storage; fastppo's backward writes ``grad_logits`` once into a buffer of its own
    (autograd's, the memory verl's torch path uses too) and leaves the logits as they are."""
    fn = "fastppo.compat.verl.logprobs_from_logits"
    H.check_logits(fn, logits)
    H.check_index(fn, "labels", labels, logits)
    return H.logprob_entropy(fn, "labels", logits, labels)[0]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits, -1)``: ``logits [..., V]`` to ``[...]`` in the logits' dtype,
    differentiable; one fused pass (verl's materializes the ``[..., V]`` softmax)."""
    return H.entropy("fastppo.compat.verl.entropy_from_logits", logits)


def logprobs_and_entropy_from_logits(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """``(logprobs_from_logits(logits, labels), entropy_from_logits(logits))`` from one pass over the
    logits (verl's actor makes both calls on the same logits: two passes, each with its backward).
    Not a verl function; the shapes and dtypes are those of the two it stands for."""
    fn = "fastppo.compat.verl.logprobs_and_entropy_from_logits"
    H.check_logits(fn, logits)
    H.check_index(fn, "labels", labels, logits)
    return H.logprob_entropy(fn, "labels", logits, labels)


# ------------------------------------------------------------------ aggregation


def _masked_sum(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """verl's masked sum: values where the mask is nonzero (a NaN elsewhere is dropped), times the mask."""
    kept = torch.where(mask.bool(), values, 0.0) * mask
    return kept.sum() if dim is None else kept.sum(dim)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """verl's masked mean: the masked sum over ``mask.sum() + 1e-8`` (0 for an empty mask)."""
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def _check_mode(fn: str, mode, loss_mat: Tensor) -> None:
    if not isinstance(mode, str) or mode not in AGG_MODES:
        raise ValueError(f"{fn}: loss_agg_mode must be one of {list(AGG_MODES)}, got {mode!r}")
    if mode != "token-mean" and loss_mat.dim() != 2:
        raise ValueError(f"{fn}: loss_agg_mode={mode!r} needs 2-D [batch, response_length] inputs, got shape "
                         f"{tuple(loss_mat.shape)}")


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None) -> Tensor:
    """A ``[B, T]`` loss matrix reduced to a scalar as verl's ``agg_loss`` does (plain torch
    reductions: nothing to fuse in a sum; :func:`compute_policy_loss` aggregates inside its kernel).

    ``loss_mask`` is like ``loss_mat`` (bool, integer or float; a value is a weight, as in verl).
    ``loss_agg_mode``:

    - ``"token-mean"``: ``masked_sum / batch_num_tokens * dp_size``, ``batch_num_tokens`` by default
      ``loss_mask.sum()`` (NaN when it is 0, as in verl).
    - ``"seq-mean-token-sum"``: each row's masked sum; their sum over rows with a nonzero mask sum,
      divided by ``global_batch_size`` (default: the number of such rows), times ``dp_size``.
    - ``"seq-mean-token-mean"``: as above with each row's sum divided by ``its mask sum + 1e-8``.
    - ``"seq-mean-token-sum-norm"``: the masked sum over everything divided by
      ``loss_scale_factor`` (default T, the row length; so not divided by B, unlike
      ``fastppo.ppo_loss``'s mode of that name, which divides by ``B * T``); ``dp_size`` unused.

    Returns a 0-dim tensor in torch's promotion of the two dtypes (float32 at least for the
    ``seq-mean`` modes, whose row mask verl makes float32), differentiable w.r.t. ``loss_mat``."""
    fn = "fastppo.compat.verl.agg_loss"
    B.require_array(fn, "loss_mat", loss_mat, "torch")
    B.require_like(fn, "loss_mask", loss_mask, loss_mat, "loss_mat", B.FLAG_DTYPES + B.LOW_PRECISION_DTYPES)
    _check_mode(fn, loss_agg_mode, loss_mat)
    if loss_agg_mode == "token-mean":
        count = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return _masked_sum(loss_mat, loss_mask) / count * dp_size
    row_sums = (loss_mat * loss_mask).sum(-1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return row_sums.sum() / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    row_counts = loss_mask.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        row_sums = row_sums / (row_counts + 1e-8)
    rows = (row_counts > 0).float()
    return _masked_sum(row_sums, rows) / (rows.sum() if global_batch_size is None else global_batch_size) * dp_size


def _agg_dtype(values: torch.dtype, mask: torch.dtype, mode: str) -> torch.dtype:
    """The dtype :func:`agg_loss` returns for these input dtypes."""
    dtype = torch.promote_types(values, mask) if mask.is_floating_point else values
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


# ------------------------------------------------------------------ the policy loss


def _clip_range(fn: str, name: str, value, default) -> float:
    value = default if value is None else value
    if value is None:
        raise ValueError(f"{fn}: {name} is None and so is cliprange; pass cliprange (or cliprange_low and "
                         "cliprange_high)")
    return B.require_real(fn, name, value, "a finite number > 0", 0.0, open_low=True)


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cliprange: Optional[float] = None, cliprange_low: Optional[float] = None,
                        cliprange_high: Optional[float] = None, clip_ratio_c: float = 3.0,
                        loss_agg_mode: str = "token-mean") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """verl's clipped PPO policy loss with dual clip: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.

    Args:
        old_log_prob: ``[B, T]`` (any shape for ``"token-mean"``), float32, float64, bfloat16 or
            float16 (mixed dtypes promote as in torch): the rollout's log-probs.
        log_prob: like ``old_log_prob``: the policy's log-probs, differentiable.
        advantages: like ``old_log_prob``, used as given (verl does not normalize them here). Like
            everything but ``log_prob`` and ``old_log_prob``, they get no gradient.
        response_mask: like ``log_prob``, bool, integer or float, 0/1: the response tokens.
        cliprange: the clip c, the default of both bounds.
        cliprange_low: the ratio is clipped to ``[1 - low, 1 + high]``, each > 0; None: ``cliprange``.
        cliprange_high: as ``cliprange_low``, the upper bound.
        clip_ratio_c: > 1; the loss of a token with a negative advantage is at most
            ``-advantage * clip_ratio_c`` (dual clip, always on as in verl; ``math.inf``: off).
        loss_agg_mode: one of :data:`AGG_MODES`, aggregated as :func:`agg_loss`.

    Returns:
        ``pg_loss``: 0-dim, differentiable w.r.t. ``log_prob``, in :func:`agg_loss`'s dtype for
        these inputs. ``pg_clipfrac``: the masked mean of "the clipped term is the larger one"
        (ratio above ``1 + high`` with a positive advantage, or below ``1 - low`` with a negative
        one). ``ppo_kl``: the masked mean of ``old_log_prob - log_prob`` (differentiable, as verl's).
        ``pg_clipfrac_lower``: the masked mean of "the dual clip binds" (negative advantage and
        ratio above ``clip_ratio_c``). Masked means divide by ``response_mask.sum() + 1e-8``.

    The loss and its gradient are one :func:`fastppo.ppo_loss` pass (``clip_coef``,
    ``clip_coef_high``, ``dual_clip`` = ``cliprange_low``, ``cliprange_high``, ``clip_ratio_c``,
    ``norm_adv=False``, ``agg=loss_agg_mode``) on verl's clamped log-ratio. Where fastppo's
    definitions differ, verl's are kept:

    - the log-ratio is clamped to ``[-20, 20]`` before ``exp`` (gradient 0 outside), as in verl; the
      kernel takes the clamped log-ratio as its new log-prob against an old log-prob of 0;
    - the three stats are verl's, computed here in torch (a few elementwise ops, no graph but
      ``ppo_kl``'s): fastppo's ``clipfrac`` counts any ratio outside the bounds whatever the
      advantage's sign, its ``clipfrac_low + clipfrac_high`` is verl's ``pg_clipfrac``, it has no
      dual-clip fraction, and its means divide by the selected count, not ``count + 1e-8``. verl's
      ``ppo_kl`` is fastppo's ``old_approx_kl`` (same sign: old minus new), not ``approx_kl`` (k3);
    - ``"seq-mean-token-sum-norm"`` divides by T (fastppo: by ``B * T``): the kernel's loss times B;
    - with no selected token the loss is NaN (verl's 0/0; fastppo returns 0), with zero gradient,
      except under ``"seq-mean-token-sum-norm"`` (0, as both give);
    - ``"seq-mean-token-mean"`` divides each row by its count plus 1e-8; that changes a result only
      for a float64 mask (torch makes an integer or bool mask's count + 1e-8 a float32, where it
      rounds to the count), and then each row's ``count / (count + 1e-8)`` is passed to the kernel
      as ``is_weights``;
    - the loss comes back in verl's dtype: bfloat16 / float16 inputs are computed in float32 and the
      loss is rounded to that dtype once (verl computes every step in that dtype).

    The mask must be 0/1: the kernel counts a nonzero value as selected, where verl would weight by
    it. Unselected tokens are not read, so a NaN there is ignored in every mode (verl's token-mean
    ignores it too; its sequence modes multiply it by 0 and give NaN). Bad settings raise
    ``ValueError`` naming the argument where verl asserts; ``cliprange_low`` of 0 (which verl takes)
    is refused, as ``fastppo.ppo_loss`` needs a clip > 0.
    """
    fn = "fastppo.compat.verl.compute_policy_loss"
    low = _clip_range(fn, "cliprange_low", cliprange_low, cliprange)
    high = _clip_range(fn, "cliprange_high", cliprange_high, cliprange)
    return _policy_loss(fn, old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode)


def _field(config, name: str, default=None):
    """A setting of verl's actor config (an ``ActorConfig``, a mapping or any object with attributes)."""
    if hasattr(config, "get"):
        return config.get(name, default)
    return getattr(config, name, default)


def compute_policy_loss_vanilla(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, dict]:
    """verl's registered ``"vanilla"`` policy loss: :func:`compute_policy_loss` with its settings read
    from the actor config, returning ``(pg_loss, pg_metrics)``.

    ``config`` (required, as in verl): verl's ``ActorConfig`` or anything with its fields
    (attributes or keys): ``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` (None: ``clip_ratio``),
    ``clip_ratio_c`` (default 3.0) and ``global_batch_info`` (a dict of :func:`agg_loss`'s
    ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``; default empty).
    ``rollout_is_weights``: optional, like ``log_prob``, multiplies each token's loss (verl's rollout
    correction), passed to the kernel as ``is_weights``; not differentiated.
    ``pg_metrics``: ``{"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}`` as Python
    floats (``.item()``: a host sync, as in verl). Every difference from ``fastppo.ppo_loss`` is
    handled as in :func:`compute_policy_loss`; the global batch sizes rescale the kernel's loss by
    its own normalizer over verl's (selected tokens, sequences with a selected token, or ``B * T``).
    """
    fn = "fastppo.compat.verl.compute_policy_loss_vanilla"
    if config is None:
        raise ValueError(f"{fn}: config is None; pass the actor config (clip_ratio, clip_ratio_low, ...)")
    clip = _field(config, "clip_ratio")
    low = _clip_range(fn, "config.clip_ratio_low", _field(config, "clip_ratio_low"), clip)
    high = _clip_range(fn, "config.clip_ratio_high", _field(config, "clip_ratio_high"), clip)
    batch = dict(_field(config, "global_batch_info", None) or {})
    unknown = set(batch) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"}
    if unknown:
        raise ValueError(f"{fn}: config.global_batch_info has keys {sorted(unknown)} that agg_loss does not take")
    if rollout_is_weights is not None:
        B.require_like(fn, "rollout_is_weights", rollout_is_weights, log_prob, "log_prob", H.LOGIT_DTYPES)
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = _policy_loss(
        fn, old_log_prob, log_prob, advantages, response_mask, low, high, _field(config, "clip_ratio_c", 3.0),
        loss_agg_mode, rollout_is_weights, **batch)
    metrics = {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.detach().item(),
               "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()}
    return pg_loss, metrics


def _policy_loss(fn: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                 low: float, high: float, clip_ratio_c, mode, is_weights: Optional[Tensor] = None, dp_size: int = 1,
                 batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss (one ppo_loss pass, rescaled to verl's normalizer) and verl's three stats."""
    B.require_array(fn, "log_prob", log_prob, "torch", H.LOGIT_DTYPES)
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        B.require_like(fn, name, x, log_prob, "log_prob", H.LOGIT_DTYPES)
    B.require_like(fn, "response_mask", response_mask, log_prob, "log_prob", B.FLAG_DTYPES + B.LOW_PRECISION_DTYPES)
    B.check_device(fn, "log_prob", log_prob)
    c = B.require_real(fn, "clip_ratio_c", clip_ratio_c, "a number > 1 (math.inf: no dual clip)", 1.0,
                       open_low=True, finite=False)
    _check_mode(fn, mode, log_prob)

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-_LOG_RATIO_BOUND, max=_LOG_RATIO_BOUND)
    dtype = torch.promote_types(log_ratio.dtype, advantages.dtype)
    kernel_dtype = torch.float32 if B.DTYPE_NAMES[dtype] in B.LOW_PRECISION_DTYPES else dtype
    new = log_ratio.to(kernel_dtype)
    mask = response_mask if B.DTYPE_NAMES[response_mask.dtype] in B.FLAG_DTYPES else response_mask != 0
    weights = None if is_weights is None else is_weights.detach().to(kernel_dtype)
    if mode == "seq-mean-token-mean" and response_mask.dtype == torch.float64:
        counts = response_mask.sum(-1, keepdim=True)
        row_weights = (counts / (counts + 1e-8)).to(kernel_dtype)
        weights = row_weights.expand(new.shape) if weights is None else weights * row_weights
    out = ppo_loss(new, new.new_zeros(()).expand(new.shape), advantages.detach().to(kernel_dtype), mask=mask,
                   clip_coef=low, clip_coef_high=high, dual_clip=None if math.isinf(c) else c, norm_adv=False,
                   agg=mode, is_weights=weights)
    pg_loss = _to_verl_normalizer(out.loss, response_mask, mode, dp_size, batch_num_tokens, global_batch_size,
                                  loss_scale_factor)
    pg_loss = pg_loss.to(_agg_dtype(dtype, response_mask.dtype, mode))

    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        negative = advantages < 0
        clipped = ((advantages > 0) & (ratio > 1.0 + high)) | (negative & (ratio < 1.0 - low))
        pg_clipfrac = _masked_mean(clipped.float(), response_mask)
        dual = negative & (ratio > c) if math.isfinite(c) else torch.zeros_like(negative)
        pg_clipfrac_lower = _masked_mean(dual.float(), response_mask)
    ppo_kl = _masked_mean(-log_ratio, response_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def _to_verl_normalizer(loss: Tensor, mask: Tensor, mode: str, dp_size, batch_num_tokens, global_batch_size,
                        loss_scale_factor) -> Tensor:
    """ppo_loss's aggregate (over selected tokens, sequences with one, or B * T; 0 with nothing
    selected) as :func:`agg_loss` normalizes it."""
    if mode == "seq-mean-token-sum-norm":
        B_, T = mask.shape
        return loss * B_ if loss_scale_factor is None else loss * (B_ * T) / loss_scale_factor
    given = batch_num_tokens if mode == "token-mean" else global_batch_size
    if given is None:  # verl divides by this batch's own count: 0/0 = NaN with nothing selected
        selected = mask.sum()
        return torch.where(selected != 0, loss, loss.new_full((), math.nan)) * dp_size
    own = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    return loss * own / given * dp_size
