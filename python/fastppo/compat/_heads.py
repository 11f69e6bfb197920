"""The categorical head as the compat modules call it: the originals' argument names in every error,
the entropy alone, and log-probs gathered at several indices per row (TRL's top-K form).

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _buffers as B
from ..heads import _acc_dtype, _categorical_backward, _categorical_forward, categorical_logprob_entropy

LOGIT_DTYPES = B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES


def check_logits(fn: str, logits) -> None:
    """``[..., V]`` logits, V >= 1, float32/float64/bfloat16/float16, on a device fastppo runs on."""
    B.require_array(fn, "logits", logits, "torch", LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    B.check_device(fn, "logits", logits)


def check_index(fn: str, name: str, index, logits: Tensor, shape: Optional[tuple] = None, what: Optional[str] = None):
    """``index`` int64/int32 of ``shape`` (default ``logits.shape[:-1]``), on the logits' device."""
    if shape is None:
        shape, what = logits.shape[:-1], "logits.shape[:-1]"
    B.require_like(fn, name, index, logits, "logits", B.INDEX_DTYPES, tuple(shape), what)


def check_temperature(fn: str, temperature) -> float:
    return B.require_real(fn, "temperature", temperature, "a finite number > 0", 0.0, open_low=True)


def logprob_entropy(fn: str, name: str, logits: Tensor, index: Tensor,
                    temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
    """:func:`fastppo.categorical_logprob_entropy` for checked arguments; an index out of range is
    reported as ``fn``'s argument ``name``."""
    try:
        return categorical_logprob_entropy(logits, index, temperature)
    except IndexError as err:
        V = logits.shape[-1]
        bad = index[(index < 0) | (index >= V)]
        raise IndexError(f"{fn}: {name} holds {bad[0].item()} (and {bad.numel() - 1} more out of range); expected "
                         f"indices in [0, {V}), the size of the last dimension of logits") from err


def entropy(fn: str, logits: Tensor) -> Tensor:
    """The entropy ``[...]`` of ``softmax(logits)``, in the logits' dtype. The head also returns the
    log-prob of an action; action 0 of every row (a stride-0 view, nothing allocated) is in range
    for any V >= 1, and its log-prob is dropped, so it adds nothing to the gradient."""
    check_logits(fn, logits)
    zeros = torch.zeros((), dtype=torch.int64, device=logits.device).expand(logits.shape[:-1])
    return categorical_logprob_entropy(logits, zeros)[1]


# log_softmax(logits / T) gathered at index [..., K], without the [..., V] log-softmax, as custom ops
# (eager and torch.compile alike). Forward: one pass of the head (on the first index of each row)
# gives each row's log-sum-exp in the accumulation dtype; the K outputs are logits[index] / T - lse.
# Backward: with G = sum_k g_k the gradient is (scatter(g) - G p) / T. The head's backward for the
# first index with incoming G writes G (onehot - p) / T, right away from the K indices; at the K
# indices the value is computed here from p_k = exp(logits[index] / T - lse) and written over it
# (a duplicated index gets the sum of its g's), so each element is rounded once.


@torch.library.custom_op("fastppo::compat_gathered_log_softmax", mutates_args=())
def _gathered_op(logits: Tensor, index: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    _, _, stats = _categorical_forward(logits, index[..., 0], temperature)
    return _gathered(logits, index, temperature, stats).to(logits.dtype), stats


def _gathered(logits: Tensor, index: Tensor, temperature: float, stats: Tensor) -> Tensor:
    """``logits[index] / T - lse`` in the accumulation dtype (the stats' dtype)."""
    lse = stats[0].reshape(index.shape[:-1] + (1,))
    return logits.gather(-1, index).to(stats.dtype) / temperature - lse


@_gathered_op.register_fake
def _gathered_fake(logits, index, temperature):
    acc = _acc_dtype(logits.dtype)
    rows = index[..., 0].numel()
    return logits.new_empty(index.shape), logits.new_empty((2, rows), dtype=acc)


@torch.library.custom_op("fastppo::compat_gathered_log_softmax_backward", mutates_args=())
def _gathered_backward_op(logits: Tensor, index: Tensor, temperature: float, stats: Tensor, grad: Tensor) -> Tensor:
    logp = _gathered(logits, index, temperature, stats)
    g = grad.to(logp.dtype)
    total = g.sum(-1)
    grad_logits = _categorical_backward(logits, index[..., 0], temperature, stats, total, None)
    same = (index.unsqueeze(-1) == index.unsqueeze(-2)).to(g.dtype)  # [..., K, K]
    at_index = ((same @ g.unsqueeze(-1)).squeeze(-1) - total.unsqueeze(-1) * logp.exp()) / temperature
    return grad_logits.scatter_(-1, index, at_index.to(grad_logits.dtype))


@_gathered_backward_op.register_fake
def _gathered_backward_fake(logits, index, temperature, stats, grad):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _gathered_setup(ctx, inputs, output):
    logits, index, temperature = inputs
    ctx.save_for_backward(logits, index, output[1])
    ctx.temperature = temperature


def _gathered_backward(ctx, grad, _grad_stats):
    logits, index, stats = ctx.saved_tensors
    return _gathered_backward_op(logits, index, ctx.temperature, stats, grad), None, None


_gathered_op.register_autograd(_gathered_backward, setup_context=_gathered_setup)


def gathered_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / T)`` gathered at ``index [..., K]`` (checked by the caller), ``[..., K]``
    in the logits' dtype. K = 1 is one call of the head; K = 0 an empty result."""
    if index.shape[-1] == 0:
        return logits.gather(-1, index)
    if index.shape[-1] == 1:
        return categorical_logprob_entropy(logits, index[..., 0], temperature)[0].unsqueeze(-1)
    return _gathered_op(logits, index, temperature)[0]
