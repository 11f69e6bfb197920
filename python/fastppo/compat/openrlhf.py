"""OpenRLHF's log-prob and entropy helpers on fastppo's categorical head: change one import.

    from openrlhf.models.utils import log_probs_from_logits      # before
    from fastppo.compat.openrlhf import log_probs_from_logits    # after

Written from ``openrlhf/models/utils.py`` of OpenRLHF at commit 3c3be62 (August 2026, version
0.11.0). OpenRLHF itself (and deepspeed, which its module imports) is not imported.
"""

from __future__ import annotations

from torch import Tensor

from . import _heads as H

__all__ = ["compute_entropy", "log_probs_from_logits"]


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature, -1)`` at ``labels``.

    Args:
        logits: ``[..., V]`` float32, float64, bfloat16 or float16, any strides; differentiable.
        labels: ``[...]`` int64 or int32 in ``[0, V)``.
        temperature: > 0.

    Returns:
        ``[...]`` in the logits' dtype, as OpenRLHF returns it; the gradient reaches the logits
        through the division by ``temperature``, as in OpenRLHF.

    One fused pass of :func:`fastppo.categorical_logprob_entropy`, which divides by the temperature
    as it reads the logits. One difference, on purpose: OpenRLHF divides the caller's logits in
    place (``logits.div_(temperature)``), so after its call they are the scaled logits; here they are
    left as they were (the returned log-probs are the same). A caller that reads the logits again
    and wants them scaled divides them itself. A temperature <= 0 (which OpenRLHF would divide by)
    is refused with ``ValueError``.
    """
    fn = "fastppo.compat.openrlhf.log_probs_from_logits"
    H.check_logits(fn, logits)
    H.check_index(fn, "labels", labels, logits)
    temperature = H.check_temperature(fn, temperature)
    return H.logprob_entropy(fn, "labels", logits, labels, temperature)[0]


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits, -1)``: ``logits [..., V]`` to ``[...]`` in the logits' dtype,
    differentiable; one fused pass (OpenRLHF's materializes the ``[..., V]`` softmax)."""
    return H.entropy("fastppo.compat.openrlhf.compute_entropy", logits)
