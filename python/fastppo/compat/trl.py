"""TRL's log-prob and entropy helpers on fastppo's categorical head: change one import.

    from trl.trainer.utils import selective_log_softmax      # before
    from fastppo.compat.trl import selective_log_softmax     # after

Written from ``trl/trainer/utils.py`` of TRL 1.16.0 (``selective_log_softmax(logits, index,
temperature=1.0, row_mask=None)``, ``entropy_from_logits(logits, chunk_size=128)``,
``selective_log_softmax_and_entropy(...)``); the two-argument ``selective_log_softmax(logits,
index)`` of earlier releases (TRL 1.10, commit f2cd577) is the same call. TRL itself
is not imported.

What differs from TRL's torch path, and why it does not change a result:

- TRL gathers ``logits.log_softmax(-1)`` row by row (float32 / float64: gathered logit minus a
  ``logsumexp``; bfloat16 / float16: ``log_softmax`` in that dtype) and backward materializes the
  ``[..., V]`` softmax. Here one streaming pass per row gives the log-prob and the entropy, and
  backward writes the logits' gradient from the saved per-row log-sum-exp: the same values up to
  rounding. For bfloat16 / float16 logits the sums run in float32 and each output is the float32
  result rounded once to the logits' dtype. (On CUDA, TRL 1.16 has a fused Triton path of its own
  for the one-index form; this is the same computation on fastppo's kernel, CPU and CUDA alike.)
- ``chunk_size`` of ``entropy_from_logits`` only bounds TRL's peak memory; the head needs no chunks
  (memory beyond the inputs is O(rows)), so it is accepted and not used.
- ``row_mask``: a row whose mask is 0 returns 0 (log-prob and entropy) and gets no gradient, as in
  TRL; its index is not read (TRL's fused CUDA path skips it too), so it may be out of range.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _heads as H
from .. import _buffers as B

__all__ = ["entropy_from_logits", "selective_log_softmax", "selective_log_softmax_and_entropy"]


def _row_mask(fn: str, row_mask, index: Tensor, logits: Tensor) -> Optional[Tensor]:
    """``row_mask`` as a bool ``[...]`` "keep" tensor (None: every row), shaped like ``index``."""
    if row_mask is None:
        return None
    B.require_like(fn, "row_mask", row_mask, index, "index", B.FLAG_DTYPES)
    return row_mask != 0


def _safe_index(index: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Index 0 where a row is masked out, so its (unread) index is always in range."""
    return index if keep is None else torch.where(keep, index, torch.zeros((), dtype=index.dtype, device=index.device))


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Optional[Tensor] = None) -> Tensor:
    """``log_softmax(logits / temperature, -1)`` gathered at ``index`` along the last dimension.

    Args:
        logits: ``[..., V]`` float32, float64, bfloat16 or float16, CPU or CUDA, any strides.
            Differentiable.
        index: ``[...]`` (one log-prob per row) or ``[..., K]`` (K per row, e.g. top-K) int64 or
            int32 indices in ``[0, V)``.
        temperature: > 0 (TRL raises ``ValueError`` otherwise, and so does this).
        row_mask: optional, shaped like ``index``, bool or 0/1: rows where it is 0 give 0.

    Returns:
        ``index``'s shape, in the logits' dtype, as TRL returns it.

    ``[...]`` indices take one fused pass (:func:`fastppo.categorical_logprob_entropy`). ``[..., K]``
    indices take the same pass for the row's log-sum-exp, then gather the K logits; backward writes
    the gradient in one pass of the head and corrects the K gathered elements (duplicates allowed).
    An index out of range is an ``IndexError`` on the CPU; on CUDA its log-prob is NaN.
    """
    fn = "fastppo.compat.trl.selective_log_softmax"
    H.check_logits(fn, logits)
    temperature = H.check_temperature(fn, temperature)
    if isinstance(index, Tensor) and index.dim() == logits.dim():
        H.check_index(fn, "index", index, logits, logits.shape[:-1] + index.shape[-1:],
                      "logits.shape[:-1] + (K,)")
        keep = _row_mask(fn, row_mask, index, logits)
        index = _safe_index(index, keep)
        if index.is_cpu and index.numel() > 0 and not torch.compiler.is_compiling():  # a host check, as the head's
            V = logits.shape[-1]
            bad = index[(index < 0) | (index >= V)]
            if bad.numel() > 0:
                raise IndexError(f"{fn}: index holds {bad[0].item()} (and {bad.numel() - 1} more out of range); "
                                 f"expected indices in [0, {V}), the size of the last dimension of logits")
        logp = H.gathered_log_softmax(logits, index, temperature)
    else:
        H.check_index(fn, "index", index, logits, logits.shape[:-1],
                      "logits.shape[:-1] (or logits.shape[:-1] + (K,) for K per row)")
        keep = _row_mask(fn, row_mask, index, logits)
        logp = H.logprob_entropy(fn, "index", logits, _safe_index(index, keep), temperature)[0]
    return logp if keep is None else logp.masked_fill(~keep, 0.0)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy (nats) of ``softmax(logits, -1)``: ``logits [..., V]`` (dtypes as
    :func:`selective_log_softmax`) to ``[...]`` in the logits' dtype, differentiable.

    ``chunk_size`` is accepted for TRL's signature (a positive int) and not needed: the fused head
    never holds more than O(rows) beyond the logits."""
    fn = "fastppo.compat.trl.entropy_from_logits"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")
    return H.entropy(fn, logits)


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(selective_log_softmax(logits, index, temperature, row_mask), entropy)`` from one pass over
    the logits: ``logits [..., V]``, ``index [...]`` (one per row), both outputs ``[...]`` in the
    logits' dtype; the entropy is that of ``softmax(logits / temperature)``, 0 where ``row_mask`` is
    0, and detached unless ``entropy_requires_grad``."""
    fn = "fastppo.compat.trl.selective_log_softmax_and_entropy"
    H.check_logits(fn, logits)
    temperature = H.check_temperature(fn, temperature)
    H.check_index(fn, "index", index, logits)
    keep = _row_mask(fn, row_mask, index, logits)
    logp, ent = H.logprob_entropy(fn, "index", logits, _safe_index(index, keep), temperature)
    if not entropy_requires_grad:
        ent = ent.detach()
    if keep is not None:
        logp, ent = logp.masked_fill(~keep, 0.0), ent.masked_fill(~keep, 0.0)
    return logp, ent
