"""Fused policy heads: categorical (optionally masked), multi-discrete, diagonal-Gaussian and
tanh-squashed Gaussian log-prob and entropy, and the categorical samplers.

Same layering as ``loss.py``: raw calls into ``fastppo._C``; an ``autograd.Function`` per head for
eager mode; custom ops (forward and backward, each with a fake implementation) for
``torch.compile``; and the public functions, which check their arguments.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

import itertools
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C
from . import _buffers as B

_LOGIT_DTYPES = B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _flat(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.reshape(-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: Optional[Tensor], width: int) -> Optional[Tensor]:
    """``x`` as ``[rows, width]``, a view where the strides allow (the caller holds the result
    through the kernel call: a reshape may copy)."""
    return None if x is None else x.reshape(-1, width)


# ------------------------------------------------------------------ categorical: raw calls


def _categorical_views(logits: Tensor, actions: Tensor):
    """``[rows, A]`` logits and ``[rows]`` actions, as views where the strides allow."""
    return logits.reshape(-1, logits.shape[-1]), actions.reshape(-1)


def _categorical_outputs(logits: Tensor, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Log-prob and entropy ``[rows]`` in the logits' dtype, and the stats ``[2, rows]`` in the
    accumulation dtype (the log-sum-exp and the unrounded entropy, which backward reads)."""
    logprob = torch.empty(rows, dtype=logits.dtype, device=logits.device)
    entropy = torch.empty(rows, dtype=logits.dtype, device=logits.device)
    stats = torch.empty((2, rows), dtype=_acc_dtype(logits.dtype), device=logits.device)
    return logprob, entropy, stats


def _categorical_forward(logits: Tensor, actions: Tensor, temperature: float,
                         mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    rows2d, flat_actions = _categorical_views(logits, actions)
    rows, A = rows2d.shape
    mask2d = _rows(mask, A)
    logprob, entropy, stats = _categorical_outputs(logits, rows)
    _C.categorical_forward(
        rows, A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), B.spec(flat_actions), B.DTYPE_NAMES[actions.dtype],
        temperature, logprob.data_ptr(), entropy.data_ptr(), stats.data_ptr(), *B.device_stream(logits),
        B.spec(mask2d),
    )
    return logprob.reshape(actions.shape), entropy.reshape(actions.shape), stats


def _grad_as(grad: Optional[Tensor], logits: Tensor) -> Optional[Tensor]:
    """An incoming gradient as the kernel reads it: ``[rows]`` in the logits' dtype (autograd hands
    it over in the output's dtype, which is that one; a reshape or cast may copy: the caller holds
    the result through the kernel call)."""
    return None if grad is None else grad.reshape(-1).to(logits.dtype)


def _categorical_backward(logits: Tensor, actions: Tensor, temperature: float, stats: Tensor,
                          grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                          mask: Optional[Tensor] = None) -> Tensor:
    rows2d, flat_actions = _categorical_views(logits, actions)
    A = rows2d.shape[1]
    mask2d = _rows(mask, A)
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g_lp, g_ent = _grad_as(grad_logprob, logits), _grad_as(grad_entropy, logits)
    stats = stats.contiguous()
    _C.categorical_backward(
        rows2d.shape[0], A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), B.spec(flat_actions),
        B.DTYPE_NAMES[actions.dtype], temperature, stats.data_ptr(), B.spec(g_lp), B.spec(g_ent),
        grad_logits.data_ptr(), *B.device_stream(logits), B.spec(mask2d),
    )
    return grad_logits


class _Categorical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, actions, temperature, mask):
        logprob, entropy, stats = _categorical_forward(logits, actions, temperature, mask)
        ctx.save_for_backward(logits, actions, stats, mask)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None
        logits, actions, stats, mask = ctx.saved_tensors
        grad = _categorical_backward(logits, actions, ctx.temperature, stats, grad_logprob, grad_entropy, mask)
        return grad, None, None, None


@torch.library.custom_op("fastppo::categorical_logprob_entropy", mutates_args=())
def _categorical_op(logits: Tensor, actions: Tensor, temperature: float,
                    mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, stats = _categorical_forward(logits, actions, temperature, mask)
    return logprob, entropy, stats


@_categorical_op.register_fake
def _categorical_fake(logits, actions, temperature, mask=None):
    rows = actions.numel()
    stats = logits.new_empty((2, rows), dtype=_acc_dtype(logits.dtype))
    return logits.new_empty(actions.shape), logits.new_empty(actions.shape), stats


@torch.library.custom_op("fastppo::categorical_backward", mutates_args=())
def _categorical_backward_op(logits: Tensor, actions: Tensor, temperature: float, stats: Tensor,
                             grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                             mask: Optional[Tensor] = None) -> Tensor:
    return _categorical_backward(logits, actions, temperature, stats, grad_logprob, grad_entropy, mask)


@_categorical_backward_op.register_fake
def _categorical_backward_fake(logits, actions, temperature, stats, grad_logprob, grad_entropy, mask=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _categorical_setup(ctx, inputs, output):
    logits, actions, temperature, mask = inputs
    ctx.save_for_backward(logits, actions, output[2], mask)
    ctx.temperature = temperature


def _categorical_op_backward(ctx, grad_logprob, grad_entropy, _grad_stats):
    logits, actions, stats, mask = ctx.saved_tensors
    grad = _categorical_backward_op(logits, actions, ctx.temperature, stats, grad_logprob, grad_entropy, mask)
    return grad, None, None, None


_categorical_op.register_autograd(_categorical_op_backward, setup_context=_categorical_setup)


def _check_logits(fn: str, logits) -> None:
    """``[..., A]`` logits, A >= 1, of a dtype the heads take on their device."""
    B.require_array(fn, "logits", logits, "torch", _LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape [..., A] with A >= 1, got {tuple(logits.shape)}")
    B.check_device(fn, "logits", logits)


def _check_mask(fn: str, mask, logits: Tensor) -> None:
    """None, or a bool tensor of the logits' shape and device (any strides)."""
    if mask is not None:
        B.require_like(fn, "mask", mask, logits, "logits", ("bool",))


def _illegal_action_error(fn: str, actions: Tensor, legal: Tensor, has_legal: Tensor, err) -> ValueError:
    """The ValueError for actions that their mask marks illegal where another action is legal
    (``legal``, ``has_legal``: like ``actions``, whether each taken action is legal and whether its
    distribution has a legal action); the kernel's own error if there is none."""
    where = (~legal & has_legal).nonzero()
    if where.shape[0] == 0:
        return err
    first = tuple(where[0].tolist())
    return ValueError(
        f"{fn}: actions holds {actions[first].item()} at index {first}, an action that mask marks illegal "
        f"(and {where.shape[0] - 1} more such); expected a legal action (mask True) wherever one is legal"
    )


def categorical_logprob_entropy(logits: Tensor, actions: Tensor, temperature: float = 1.0,
                                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Log-prob of the taken actions and entropy of a categorical policy, fused.

    Args:
        logits: ``[..., A]`` unnormalized log-probabilities; float32, float64, bfloat16 or float16,
            on the CPU or CUDA. Differentiable. ``-inf`` marks an action that cannot be taken. The
            last dimension may be strided. bfloat16 and float16 logits are read as they are stored
            (no float32 copy of them is made, in forward or backward) and every sum (max,
            log-sum-exp, entropy) is taken in float32.
        actions: ``[...]`` int64 or int32 indices in ``[0, A)``.
        temperature: > 0; the distribution is ``softmax(logits / temperature)`` (RLHF sampling).
        mask: None, or a bool ``[..., A]`` tensor (any strides) on the logits' device: True where
            an action is legal (sb3-contrib's ``action_masks()``). The distribution is the softmax
            over the legal actions only; an illegal logit is never used (whatever it holds, NaN
            included) and its gradient is exactly 0. The kernel reads the mask as it reads the
            logits: no masked copy of the logits is made (where ``MaskableCategorical`` writes
            ``-1e8`` into a copy).

    Returns:
        ``(logprob, entropy)``, each ``[...]`` in the logits' dtype: ``log softmax(logits /
        T)[action]`` and ``-sum p log p``. For bfloat16 / float16 logits they, and the gradient of
        the logits, are float32 results rounded once to the logits' dtype (nearest even), so
        their error against float64 is about one rounding of that dtype (a relative 2^-8 for
        bfloat16, 2^-11 for float16); backward reads the log-sum-exp and the entropy saved in
        float32, not the rounded outputs.

    One streaming pass per row (online softmax): no ``log_softmax`` of the logits is made in
    forward, and backward writes ``grad_logits`` from the saved per-row log-sum-exp and entropy,
    so memory beyond the inputs and ``grad_logits`` is O(rows). An action out of range raises
    ``IndexError`` on CPU; on CUDA (where checking would sync with the host) that row's log-prob
    and entropy are NaN and its gradient 0.

    With a mask: a taken action that the mask marks illegal, in a row with a legal action, raises
    ``ValueError`` on CPU; on CUDA that row's log-prob and entropy are NaN and its gradient 0, as
    for an action out of range. A row with no legal action at all (a padded or finished step) has
    no choice to make: its log-prob and entropy are 0 and its gradient is 0, whatever its (in
    range) action, on CPU and CUDA alike. Masked and fully masked rows never give a NaN gradient;
    the rules below apply to the legal logits of a row.

    Non-finite logits, row by row (after dividing by ``temperature``):

    - ``-inf`` next to at least one finite logit (a masked action): probability 0, log-prob
      ``-inf`` if it is the action taken, nothing added to the entropy, and gradient 0 at that
      logit (but for the taken action's own log-prob term, as in ``log_softmax``), where
      ``torch.distributions.Categorical``'s entropy gradient is NaN on the whole row.
    - a NaN logit, a ``+inf`` logit (one or more), or only ``-inf`` logits: the row has no
      distribution, and its log-prob, entropy and gradient at every logit are NaN, which is what
      ``torch.log_softmax`` gives (its max subtraction makes ``inf - inf`` or ``-inf - -inf``) and
      ``-(p * log_softmax).sum(-1)`` with ``p = exp(log_softmax)`` on it. (``Categorical`` refuses
      such logits when it validates its arguments.)

    The CPU and CUDA paths give the same NaN rows and the same masked zeros.
    """
    fn = "fastppo.categorical_logprob_entropy"
    _check_logits(fn, logits)
    B.require_like(fn, "actions", actions, logits, "logits", B.INDEX_DTYPES, logits.shape[:-1], "logits.shape[:-1]")
    temperature = B.require_real(fn, "temperature", temperature, "a finite number > 0", 0.0, open_low=True)
    _check_mask(fn, mask, logits)
    if torch.compiler.is_compiling():
        logprob, entropy, _ = _categorical_op(logits, actions, temperature, mask)
        return logprob, entropy
    try:
        if not (torch.is_grad_enabled() and logits.requires_grad):  # inference (a rollout): no graph to build
            logprob, entropy, _ = _categorical_forward(logits, actions, temperature, mask)
            return logprob, entropy
        return _Categorical.apply(logits, actions, temperature, mask)
    except IndexError as err:  # from the CPU kernel's check: say which value and the range
        bad = actions[(actions < 0) | (actions >= logits.shape[-1])]
        raise IndexError(
            f"{fn}: actions holds {bad[0].item()} (and {bad.numel() - 1} more out of range); expected indices in "
            f"[0, {logits.shape[-1]}), the size of the last dimension of logits"
        ) from err
    except ValueError as err:  # from the CPU kernel's mask check: say which action
        if mask is None:
            raise
        legal = mask.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        raise _illegal_action_error(fn, actions, legal, mask.any(-1), err) from err


def _gumbel_scores(logits: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
    """``logits / T - log(-log u)`` with ``u`` uniform of the logits' shape, in the accumulation
    dtype, made in place in the noise: the logits are read, never copied (a bfloat16 / float16
    logit is widened as the addition reads it)."""
    acc = _acc_dtype(logits.dtype)
    noise = torch.rand(logits.shape, generator=generator, dtype=acc, device=logits.device)
    with torch.no_grad():
        scores = noise.clamp_(min=torch.finfo(acc).tiny).log_().neg_().log_().neg_()
        return scores.add_(logits, alpha=1.0 / temperature)


def _legal_argmax(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``torch.argmax`` over the last dimension among the legal columns: illegal scores are set to
    -inf (in place), and where the pick is still illegal (every legal score -inf, or none legal)
    the first legal column is taken instead (0 when none is)."""
    if mask is None:
        return scores.argmax(-1)
    action = scores.masked_fill_(mask.logical_not(), -math.inf).argmax(-1)
    first_legal = mask.to(torch.uint8).argmax(-1)
    taken_legal = mask.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    return torch.where(taken_legal, action, first_legal)


def _check_generator(fn: str, generator, logits: Tensor) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device != logits.device:
        raise ValueError(f"{fn}: generator is on {generator.device} but logits is on {logits.device}; expected one device")


def categorical_sample(logits: Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                       mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Samples one action per row of a categorical policy and returns it with its log-prob and the
    entropy, from one fused call: what ``get_action_and_value`` needs during a rollout, without a
    ``torch.distributions.Categorical``.

    Args:
        logits: ``[..., A]`` float32, float64, bfloat16 or float16, CPU or CUDA. The noise and
            the scores are float32 for bfloat16 / float16 logits (the logits are not copied).
        temperature: > 0; samples from ``softmax(logits / temperature)``.
        generator: the ``torch.Generator`` that draws the uniform noise (on the logits' device);
            None: torch's default generator, so ``torch.manual_seed`` makes runs repeatable.
        mask: None, or a bool ``[..., A]`` of the legal actions, as
            :func:`categorical_logprob_entropy` takes it: only legal actions are sampled.

    Returns:
        ``(action, logprob, entropy)``: int64 ``[...]``, and ``[...]`` each (in the logits' dtype)
        as :func:`categorical_logprob_entropy` gives them for that action (and mask).

    Sampling is Gumbel-max, ``argmax(logits / T - log(-log u))`` with ``u`` uniform ``[..., A]``
    from ``generator``: one ``torch.rand`` and, on the CPU, one kernel for the argmax, the log-prob
    and the entropy (on CUDA the argmax is a torch op, then the fused head). When autograd records
    (``logits.requires_grad``), ``logprob`` and ``entropy`` are differentiable w.r.t. ``logits``
    exactly as from :func:`categorical_logprob_entropy`.

    A masked action (a ``-inf`` logit next to a finite one, or an illegal one) is never sampled. A
    row without a distribution (a NaN or ``+inf`` legal logit, or only ``-inf`` legal ones), which
    ``torch.distributions.Categorical`` refuses, still gets an index in ``[0, A)``, whatever the
    noise and on every path: ``torch.argmax``'s pick among the legal actions, so the first NaN,
    else the first ``+inf``, else the first legal action (0 without a mask); its log-prob and
    entropy are NaN (see :func:`categorical_logprob_entropy`), which marks the row downstream. A
    row with no legal action gets action 0, log-prob 0 and entropy 0.
    """
    fn = "fastppo.categorical_sample"
    _check_logits(fn, logits)
    temperature = B.require_real(fn, "temperature", temperature, "a finite number > 0", 0.0, open_low=True)
    _check_generator(fn, generator, logits)
    _check_mask(fn, mask, logits)
    records = torch.is_grad_enabled() and logits.requires_grad
    if logits.is_cuda or records or torch.compiler.is_compiling():
        with torch.no_grad():
            action = _legal_argmax(_gumbel_scores(logits, temperature, generator), mask)
        logprob, entropy = categorical_logprob_entropy(logits, action, temperature, mask)
        return action, logprob, entropy
    noise = torch.rand(logits.shape, generator=generator, dtype=_acc_dtype(logits.dtype), device=logits.device)
    rows2d = logits.detach().reshape(-1, logits.shape[-1])
    rows, A = rows2d.shape
    mask2d = _rows(mask, A)
    action = torch.empty(rows, dtype=torch.int64)
    logprob, entropy, stats = _categorical_outputs(logits, rows)
    _C.categorical_sample(rows, A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), noise.data_ptr(), A, temperature,
                          action.data_ptr(), logprob.data_ptr(), entropy.data_ptr(), stats.data_ptr(),
                          B.spec(mask2d))
    shape = logits.shape[:-1]
    return action.reshape(shape), logprob.reshape(shape), entropy.reshape(shape)


# ------------------------------------------------------------------ multi-discrete

# (nvec, device) -> (offsets, stream, event): int64 [K + 1] column offsets of the components on that
# device, made once per nvec and device. On CUDA the table is copied from pinned memory without
# blocking the host, on the stream of the first call (whose kernels follow it there); a call on
# another stream waits for that copy's event first, on the device.
_OFFSETS = {}


def _nvec_offsets(nvec: Tuple[int, ...], device: torch.device) -> Tensor:
    entry = _OFFSETS.get((nvec, device))
    if entry is None:
        table = torch.tensor([0, *itertools.accumulate(nvec)], dtype=torch.int64)
        if device.type != "cuda":
            entry = (table, None, None)
        else:
            stream = torch.cuda.current_stream(device)
            table = table.pin_memory().to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            entry = (table, stream, event)
        _OFFSETS[(nvec, device)] = entry
    table, stream, event = entry
    if stream is not None and torch.cuda.current_stream(device) != stream:
        torch.cuda.current_stream(device).wait_event(event)
    return table


def _nvec(fn: str, nvec) -> Tuple[int, ...]:
    """``nvec`` as a tuple of Python ints >= 1: a sequence of ints, a 1-D numpy array (gymnasium's
    ``MultiDiscrete.nvec``) or a 1-D CPU tensor of integers."""
    if isinstance(nvec, (str, bytes)) or not hasattr(nvec, "__len__"):
        raise TypeError(f"{fn}: nvec must be a sequence of ints (each component's number of actions), "
                        f"got {type(nvec).__name__}")
    if isinstance(nvec, Tensor):
        if nvec.is_floating_point() or nvec.is_complex() or nvec.dtype == torch.bool or not nvec.is_cpu:
            raise TypeError(f"{fn}: nvec must hold integers on the CPU, got a tensor of dtype {nvec.dtype} on "
                            f"{nvec.device}")
        nvec = nvec.tolist()
    if getattr(nvec, "ndim", 1) != 1:
        raise ValueError(f"{fn}: nvec must be 1-D (one size per component), got shape {tuple(nvec.shape)}")
    sizes = []
    for n in nvec:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{fn}: nvec must hold ints, got {type(n).__name__} {n!r}")
        sizes.append(int(n))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{fn}: nvec must hold at least one size and every size must be >= 1, got {sizes}")
    return tuple(sizes)


def _multi_shapes(logits: Tensor, K: int, reduce: bool) -> Tuple[torch.Size, int]:
    """The outputs' shape (``[...]``, or ``[..., K]`` unreduced) and the number of rows."""
    lead = logits.shape[:-1]
    return (lead if reduce else lead + (K,)), math.prod(lead)


def _multi_forward(logits: Tensor, actions: Tensor, nvec: List[int], mask: Optional[Tensor],
                   reduce: bool) -> Tuple[Tensor, Tensor, Tensor]:
    K, A = len(nvec), logits.shape[-1]
    shape, rows = _multi_shapes(logits, K, reduce)
    offsets = _nvec_offsets(tuple(nvec), logits.device)
    rows2d, actions2d, mask2d = logits.reshape(-1, A), actions.reshape(-1, K), _rows(mask, A)
    logprob = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    entropy = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    stats = torch.empty((2, rows, K), dtype=_acc_dtype(logits.dtype), device=logits.device)
    _C.multi_categorical_forward(
        rows, K, A, B.DTYPE_NAMES[logits.dtype], offsets.data_ptr(), B.spec(rows2d), B.spec(actions2d),
        B.DTYPE_NAMES[actions.dtype], B.spec(mask2d), reduce, logprob.data_ptr(), entropy.data_ptr(),
        stats.data_ptr(), *B.device_stream(logits),
    )
    return logprob, entropy, stats


def _multi_grad_spec(grad: Optional[Tensor], K: int, reduce: bool) -> Optional[tuple]:
    """``(data, row stride, component stride)`` of an incoming gradient (``grad`` already in the
    logits' dtype and held by the caller); the component stride is 0 when reduced."""
    if grad is None:
        return None
    if reduce:
        return (grad.data_ptr(), grad.stride(0), 0)
    return B.spec(grad)


def _multi_backward(logits: Tensor, actions: Tensor, nvec: List[int], mask: Optional[Tensor], reduce: bool,
                    stats: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    K, A = len(nvec), logits.shape[-1]
    _, rows = _multi_shapes(logits, K, reduce)
    offsets = _nvec_offsets(tuple(nvec), logits.device)
    rows2d, actions2d, mask2d = logits.reshape(-1, A), actions.reshape(-1, K), _rows(mask, A)
    width = 1 if reduce else K
    g_lp = None if grad_logprob is None else grad_logprob.reshape(rows, width).to(logits.dtype)
    g_ent = None if grad_entropy is None else grad_entropy.reshape(rows, width).to(logits.dtype)
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    stats = stats.contiguous()
    _C.multi_categorical_backward(
        rows, K, A, B.DTYPE_NAMES[logits.dtype], offsets.data_ptr(), B.spec(rows2d), B.spec(actions2d),
        B.DTYPE_NAMES[actions.dtype], B.spec(mask2d), reduce, stats.data_ptr(), _multi_grad_spec(g_lp, K, reduce),
        _multi_grad_spec(g_ent, K, reduce), grad_logits.data_ptr(), *B.device_stream(logits),
    )
    return grad_logits


class _MultiCategorical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, actions, nvec, mask, reduce):
        logprob, entropy, stats = _multi_forward(logits, actions, nvec, mask, reduce)
        ctx.save_for_backward(logits, actions, stats, mask)
        ctx.nvec, ctx.reduce = nvec, reduce
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None
        logits, actions, stats, mask = ctx.saved_tensors
        grad = _multi_backward(logits, actions, ctx.nvec, mask, ctx.reduce, stats, grad_logprob, grad_entropy)
        return grad, None, None, None, None


@torch.library.custom_op("fastppo::multi_categorical_logprob_entropy", mutates_args=())
def _multi_op(logits: Tensor, actions: Tensor, nvec: List[int], mask: Optional[Tensor],
              reduce: bool) -> Tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, stats = _multi_forward(logits, actions, nvec, mask, reduce)
    return logprob, entropy, stats


@_multi_op.register_fake
def _multi_fake(logits, actions, nvec, mask, reduce):
    K = len(nvec)
    shape, rows = _multi_shapes(logits, K, reduce)
    stats = logits.new_empty((2, rows, K), dtype=_acc_dtype(logits.dtype))
    return logits.new_empty(shape), logits.new_empty(shape), stats


@torch.library.custom_op("fastppo::multi_categorical_backward", mutates_args=())
def _multi_backward_op(logits: Tensor, actions: Tensor, nvec: List[int], mask: Optional[Tensor], reduce: bool,
                       stats: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    return _multi_backward(logits, actions, nvec, mask, reduce, stats, grad_logprob, grad_entropy)


@_multi_backward_op.register_fake
def _multi_backward_fake(logits, actions, nvec, mask, reduce, stats, grad_logprob, grad_entropy):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _multi_setup(ctx, inputs, output):
    logits, actions, nvec, mask, reduce = inputs
    ctx.save_for_backward(logits, actions, output[2], mask)
    ctx.nvec, ctx.reduce = nvec, reduce


def _multi_op_backward(ctx, grad_logprob, grad_entropy, _grad_stats):
    logits, actions, stats, mask = ctx.saved_tensors
    grad = _multi_backward_op(logits, actions, ctx.nvec, mask, ctx.reduce, stats, grad_logprob, grad_entropy)
    return grad, None, None, None, None


_multi_op.register_autograd(_multi_op_backward, setup_context=_multi_setup)


def _check_multi(fn: str, logits, nvec, mask) -> Tuple[int, ...]:
    _check_logits(fn, logits)
    nvec = _nvec(fn, nvec)
    if sum(nvec) != logits.shape[-1]:
        raise ValueError(f"{fn}: logits has shape {tuple(logits.shape)}; expected its last dimension to be "
                         f"sum(nvec) = {sum(nvec)} (nvec = {list(nvec)})")
    _check_mask(fn, mask, logits)
    return nvec


def _component_legal(actions: Tensor, nvec: Tuple[int, ...], mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Per component (``[..., K]``): whether its taken action is legal and whether it has a legal
    action (for error messages: only on failure). Actions out of range are taken as legal."""
    offsets = torch.tensor([0, *itertools.accumulate(nvec)][:-1], device=actions.device)
    columns = (actions.long() + offsets).clamp(0, mask.shape[-1] - 1)
    legal = mask.gather(-1, columns)
    has_legal = torch.stack([part.any(-1) for part in mask.split(list(nvec), -1)], -1)
    return legal, has_legal


def multi_categorical_logprob_entropy(logits: Tensor, actions: Tensor, nvec: Sequence[int],
                                      mask: Optional[Tensor] = None, reduce: bool = True) -> Tuple[Tensor, Tensor]:
    """Log-prob and entropy of a multi-discrete policy (independent categorical components over
    concatenated logits, gymnasium's ``MultiDiscrete``), fused: one pass over the logits forward
    and one backward, whatever the number of components.

    Args:
        logits: ``[..., sum(nvec)]`` float32, float64, bfloat16 or float16, CPU or CUDA; the
            components' logits side by side, component k's at columns ``[sum(nvec[:k]),
            sum(nvec[:k + 1]))`` (what a policy's single ``Linear(hidden, sum(nvec))`` gives, and
            what SB3's ``MultiCategoricalDistribution`` splits). Differentiable; any strides.
            bfloat16 / float16 are read as stored and computed in float32, as in
            :func:`categorical_logprob_entropy`.
        actions: ``[..., len(nvec)]`` int64 or int32; component k's action in ``[0, nvec[k])``.
        nvec: each component's number of actions (a sequence of ints >= 1, a 1-D numpy array such
            as ``MultiDiscrete.nvec``, or a 1-D CPU tensor).
        mask: None, or a bool ``[..., sum(nvec)]`` tensor of the legal actions, flat over the
            components as sb3-contrib's ``MaskablePPO`` takes it (``action_masks()`` of a
            ``MultiDiscrete`` env). Each component follows :func:`categorical_logprob_entropy`'s
            mask rules on its own columns: softmax over its legal actions, exactly 0 gradient at
            an illegal logit, a taken illegal action a ``ValueError`` on CPU (NaN with zero
            gradient on CUDA), and a component with no legal action log-prob 0, entropy 0 and
            zero gradient.
        reduce: True: the log-probs and entropies summed over the components (the policy's log-prob
            and entropy); False: per component.

    Returns:
        ``(logprob, entropy)`` in the logits' dtype: ``[...]`` each, or ``[..., len(nvec)]`` with
        ``reduce=False``. The sums are taken in float32 (float64 for float64 logits) and rounded
        once. Each component is streamed with the categorical head's online softmax, so
        non-finite logits follow that head's rules per component. An action out of range raises
        ``IndexError`` on CPU (NaN for that component on CUDA).
    """
    fn = "fastppo.multi_categorical_logprob_entropy"
    nvec = _check_multi(fn, logits, nvec, mask)
    B.require_like(fn, "actions", actions, logits, "logits", B.INDEX_DTYPES, logits.shape[:-1] + (len(nvec),),
                   "logits.shape[:-1] + (len(nvec),)")
    if not isinstance(reduce, bool):
        raise TypeError(f"{fn}: reduce must be a bool, got {type(reduce).__name__} {reduce!r}")
    nvec_list = list(nvec)
    if torch.compiler.is_compiling():
        logprob, entropy, _ = _multi_op(logits, actions, nvec_list, mask, reduce)
        return logprob, entropy
    try:
        if not (torch.is_grad_enabled() and logits.requires_grad):
            logprob, entropy, _ = _multi_forward(logits, actions, nvec_list, mask, reduce)
            return logprob, entropy
        return _MultiCategorical.apply(logits, actions, nvec_list, mask, reduce)
    except IndexError as err:
        bad = (actions < 0) | (actions >= torch.tensor(nvec, device=actions.device))
        first = tuple(bad.nonzero()[0].tolist())
        raise IndexError(
            f"{fn}: actions holds {actions[first].item()} at index {first} (and {int(bad.sum()) - 1} more out of "
            f"range); expected component k's action in [0, nvec[k]) (nvec = {nvec_list})"
        ) from err
    except ValueError as err:
        if mask is None:
            raise
        raise _illegal_action_error(fn, actions, *_component_legal(actions, nvec, mask), err) from err


def _segment_argmax(scores: Tensor, nvec: Tuple[int, ...], mask: Optional[Tensor]) -> Tensor:
    """Each component's ``_legal_argmax`` over its columns of ``scores`` ``[..., A]``: ``[..., K]``
    int64. Equal sizes: one argmax over ``[..., K, n]``; otherwise one per component."""
    if len(set(nvec)) == 1:
        shape = scores.shape[:-1] + (len(nvec), nvec[0])
        return _legal_argmax(scores.reshape(shape), None if mask is None else mask.reshape(shape))
    parts = scores.split(list(nvec), -1)
    masks = [None] * len(nvec) if mask is None else mask.split(list(nvec), -1)
    return torch.stack([_legal_argmax(s, m) for s, m in zip(parts, masks)], -1)


def multi_categorical_sample(logits: Tensor, nvec: Sequence[int], mask: Optional[Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Samples each component of a multi-discrete policy and returns the actions with their summed
    log-prob and entropy: :func:`categorical_sample` for :func:`multi_categorical_logprob_entropy`.

    Args:
        logits: ``[..., sum(nvec)]`` as :func:`multi_categorical_logprob_entropy` takes them.
        nvec: each component's number of actions.
        mask: None, or a bool ``[..., sum(nvec)]`` of the legal actions: only legal actions are
            sampled.
        generator: the ``torch.Generator`` of the uniform noise (on the logits' device), or None.

    Returns:
        ``(actions, logprob, entropy)``: int64 ``[..., len(nvec)]``, and ``[...]`` each in the
        logits' dtype, as :func:`multi_categorical_logprob_entropy` gives them for those actions.

    Gumbel-max per component with one ``torch.rand`` of the logits' shape: on the CPU without
    autograd one kernel samples every component and takes the log-prob and entropy; otherwise
    the argmax is torch's, then the fused head. Each component picks as
    :func:`categorical_sample` picks a row (rows without a distribution, no legal action).
    """
    fn = "fastppo.multi_categorical_sample"
    nvec = _check_multi(fn, logits, nvec, mask)
    _check_generator(fn, generator, logits)
    records = torch.is_grad_enabled() and logits.requires_grad
    if logits.is_cuda or records or torch.compiler.is_compiling():
        with torch.no_grad():
            actions = _segment_argmax(_gumbel_scores(logits, 1.0, generator), nvec, mask)
        logprob, entropy = multi_categorical_logprob_entropy(logits, actions, nvec, mask)
        return actions, logprob, entropy
    noise = torch.rand(logits.shape, generator=generator, dtype=_acc_dtype(logits.dtype), device=logits.device)
    K, A = len(nvec), logits.shape[-1]
    shape, rows = _multi_shapes(logits, K, True)
    rows2d, mask2d = logits.detach().reshape(-1, A), _rows(mask, A)
    actions = torch.empty((rows, K), dtype=torch.int64)
    logprob = torch.empty(rows, dtype=logits.dtype)
    entropy = torch.empty(rows, dtype=logits.dtype)
    stats = torch.empty((2, rows, K), dtype=_acc_dtype(logits.dtype))
    _C.multi_categorical_sample(rows, K, A, B.DTYPE_NAMES[logits.dtype], _nvec_offsets(nvec, logits.device).data_ptr(),
                                B.spec(rows2d), B.spec(mask2d), noise.data_ptr(), A, actions.data_ptr(),
                                logprob.data_ptr(), entropy.data_ptr(), stats.data_ptr())
    return actions.reshape(shape + (K,)), logprob.reshape(shape), entropy.reshape(shape)




def _normal_views(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``[rows, D]`` mean and actions, and log_std as ``[D]`` (shared) or ``[rows, D]``; views where
    the strides allow (the caller holds them through the kernel call: a reshape may copy)."""
    D = mean.shape[-1]
    if log_std.dim() != 1:
        log_std = log_std.reshape(-1, D)
        if log_std.stride(0) == 0:  # a [D] log_std expanded over rows (CleanRL's expand_as): its gradient is per row
            log_std = torch.empty(log_std.shape, dtype=log_std.dtype, device=log_std.device).copy_(log_std)
    return mean.reshape(-1, D), log_std, actions.reshape(-1, D)


def _normal_forward(mean: Tensor, log_std: Tensor, actions: Tensor, squashed: bool = False,
                    pre_tanh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Both heads: ``squashed`` is the tanh-squashed one (at ``pre_tanh`` when given)."""
    views = _normal_views(mean, log_std, actions)
    rows, D = views[0].shape
    u = _rows(pre_tanh, D)
    logprob = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    entropy = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    _C.normal_forward(rows, D, B.DTYPE_NAMES[mean.dtype], *map(B.row_spec, views), logprob.data_ptr(),
                      entropy.data_ptr(), *B.device_stream(mean), squashed, B.spec(u))
    return logprob, entropy


def _normal_backward(mean: Tensor, log_std: Tensor, actions: Tensor, grad_logprob: Optional[Tensor],
                     grad_entropy: Optional[Tensor], squashed: bool = False,
                     pre_tanh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    if grad_logprob is None:
        # Only the entropy is differentiated, and it depends on log_std alone (d entropy / d log_std_d = 1):
        # no kernel pass, whose log-prob term (0 * (a - mean)^2 / sigma^2) would turn a NaN or inf action
        # or mean into a NaN gradient.
        g = grad_entropy.reshape(mean.shape[:-1] + (1,))
        grad_log_std = (g.sum() if log_std.dim() == 1 else g).expand(log_std.shape).contiguous()
        return torch.zeros(mean.shape, dtype=mean.dtype, device=mean.device), grad_log_std
    views = _normal_views(mean, log_std, actions)
    rows, D = views[0].shape
    grad_mean = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    grad_log_std = torch.empty(log_std.shape, dtype=mean.dtype, device=mean.device)
    size = _C.normal_backward_workspace(rows, D, log_std.dim() == 1)
    workspace = torch.empty(size, dtype=torch.float64, device=mean.device) if size else None
    g_lp, g_ent = _flat(grad_logprob), _flat(grad_entropy)  # a reshape may copy: held for the call
    u = _rows(pre_tanh, D)
    _C.normal_backward(
        rows, D, B.DTYPE_NAMES[mean.dtype], *map(B.row_spec, views), B.spec(g_lp), B.spec(g_ent),
        grad_mean.data_ptr(), grad_log_std.data_ptr(), None if workspace is None else workspace.data_ptr(),
        *B.device_stream(mean), squashed, B.spec(u),
    )
    return grad_mean, grad_log_std


class _Normal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, log_std, actions):
        ctx.save_for_backward(mean, log_std, actions)
        ctx.set_materialize_grads(False)
        return _normal_forward(mean, log_std, actions)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None
        mean, log_std, actions = ctx.saved_tensors
        grad_mean, grad_log_std = _normal_backward(mean, log_std, actions, grad_logprob, grad_entropy)
        return grad_mean, grad_log_std, None


@torch.library.custom_op("fastppo::normal_logprob_entropy", mutates_args=())
def _normal_op(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
    return _normal_forward(mean, log_std, actions)


@_normal_op.register_fake
def _normal_fake(mean, log_std, actions):
    return mean.new_empty(mean.shape[:-1]), mean.new_empty(mean.shape[:-1])


@torch.library.custom_op("fastppo::normal_backward", mutates_args=())
def _normal_backward_op(mean: Tensor, log_std: Tensor, actions: Tensor, grad_logprob: Optional[Tensor],
                        grad_entropy: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _normal_backward(mean, log_std, actions, grad_logprob, grad_entropy)


@_normal_backward_op.register_fake
def _normal_backward_fake(mean, log_std, actions, grad_logprob, grad_entropy):
    return mean.new_empty(mean.shape), mean.new_empty(log_std.shape)


def _normal_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _normal_op_backward(ctx, grad_logprob, grad_entropy):
    mean, log_std, actions = ctx.saved_tensors
    grad_mean, grad_log_std = _normal_backward_op(mean, log_std, actions, grad_logprob, grad_entropy)
    return grad_mean, grad_log_std, None


_normal_op.register_autograd(_normal_op_backward, setup_context=_normal_setup)


def _check_normal(fn: str, mean, log_std, actions) -> None:
    B.require_array(fn, "mean", mean, "torch", B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES)
    if mean.dim() < 1 or mean.shape[-1] < 1:
        raise ValueError(f"{fn}: mean must have shape [..., D] with D >= 1, got {tuple(mean.shape)}")
    B.require_like(fn, "actions", actions, mean, "mean")
    shared = getattr(log_std, "ndim", None) == 1  # anything but a tensor is refused next
    B.require_like(fn, "log_std", log_std, mean, "mean", shape=mean.shape[-1:] if shared else None,
                   shape_what="mean.shape[-1:] (shared by every row) or mean.shape (per row)")
    B.check_device(fn, "mean", mean)


def normal_logprob_entropy(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
    """Log-prob and entropy of a diagonal Gaussian policy, summed over the last dimension, fused.

    Args:
        mean: ``[..., D]`` float32, float64, bfloat16 or float16; differentiable.
        log_std: ``[D]`` (one log-std shared by every row, as CleanRL's continuous agent learns it)
            or ``[..., D]`` like ``mean``; same dtype; differentiable. A shared log_std's gradient
            is summed over rows in a fixed order (the same bits every run).
        actions: ``[..., D]`` like ``mean``.

    Returns:
        ``(logprob, entropy)``, each ``[...]``: ``sum_d log N(a_d; mean_d, exp(log_std_d))`` and
        ``sum_d (0.5 + 0.5 log(2 pi) + log_std_d)``; in ``mean``'s dtype.

    bfloat16 / float16: the three inputs are widened to float32 (a copy of ``[..., D]`` each,
    small next to a policy's activations), the kernel runs in float32 and the outputs are rounded
    to the input dtype, as are the gradients (autograd's casts); the sum over D is in float32.
    """
    fn = "fastppo.normal_logprob_entropy"
    _check_normal(fn, mean, log_std, actions)
    if mean.dtype in _LOW_PRECISION:  # per-row work: a float32 copy of the inputs costs little
        logprob, entropy = normal_logprob_entropy(mean.float(), log_std.float(), actions.float())
        return logprob.to(mean.dtype), entropy.to(mean.dtype)
    if torch.compiler.is_compiling():
        return _normal_op(mean, log_std, actions)
    if not (torch.is_grad_enabled() and (mean.requires_grad or log_std.requires_grad)):
        return _normal_forward(mean, log_std, actions)  # inference: no graph to build
    return _Normal.apply(mean, log_std, actions)


# ------------------------------------------------------------------ tanh-squashed Gaussian


class _TanhNormal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, log_std, actions, pre_tanh):
        ctx.save_for_backward(mean, log_std, actions, pre_tanh)
        ctx.set_materialize_grads(False)
        return _normal_forward(mean, log_std, actions, True, pre_tanh)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None
        mean, log_std, actions, pre_tanh = ctx.saved_tensors
        grad_mean, grad_log_std = _normal_backward(mean, log_std, actions, grad_logprob, grad_entropy, True, pre_tanh)
        return grad_mean, grad_log_std, None, None


@torch.library.custom_op("fastppo::tanh_normal_logprob_entropy", mutates_args=())
def _tanh_normal_op(mean: Tensor, log_std: Tensor, actions: Tensor,
                    pre_tanh: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _normal_forward(mean, log_std, actions, True, pre_tanh)


@_tanh_normal_op.register_fake
def _tanh_normal_fake(mean, log_std, actions, pre_tanh):
    return mean.new_empty(mean.shape[:-1]), mean.new_empty(mean.shape[:-1])


@torch.library.custom_op("fastppo::tanh_normal_backward", mutates_args=())
def _tanh_normal_backward_op(mean: Tensor, log_std: Tensor, actions: Tensor, pre_tanh: Optional[Tensor],
                             grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _normal_backward(mean, log_std, actions, grad_logprob, grad_entropy, True, pre_tanh)


@_tanh_normal_backward_op.register_fake
def _tanh_normal_backward_fake(mean, log_std, actions, pre_tanh, grad_logprob, grad_entropy):
    return mean.new_empty(mean.shape), mean.new_empty(log_std.shape)


def _tanh_normal_op_backward(ctx, grad_logprob, grad_entropy):
    mean, log_std, actions, pre_tanh = ctx.saved_tensors
    grad_mean, grad_log_std = _tanh_normal_backward_op(mean, log_std, actions, pre_tanh, grad_logprob, grad_entropy)
    return grad_mean, grad_log_std, None, None


_tanh_normal_op.register_autograd(_tanh_normal_op_backward, setup_context=_normal_setup)


def tanh_normal_logprob_entropy(mean: Tensor, log_std: Tensor, actions: Tensor,
                                pre_tanh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Log-prob and entropy of a tanh-squashed diagonal Gaussian policy (bounded actions in
    ``(-1, 1)``: ``a = tanh(u)``, ``u ~ N(mean, exp(log_std))``), summed over the last dimension,
    fused.

    Args:
        mean: ``[..., D]`` float32, float64, bfloat16 or float16; differentiable.
        log_std: ``[D]`` (shared by every row) or ``[..., D]``; same dtype; differentiable.
        actions: ``[..., D]``, the actions after the squash (what the environment received, before
            any rescaling to its bounds). Not differentiated.
        pre_tanh: None, or ``[..., D]`` like ``mean``: the pre-squash sample ``u`` the actions came
            from (``actions == tanh(pre_tanh)``), kept from the rollout. Given, the head is
            evaluated at it and ``actions`` is not read; this is exact where ``atanh(actions)``
            is not (an action rounded to +-1). Not differentiated.

    Returns:
        ``(logprob, entropy)``, each ``[...]`` in ``mean``'s dtype:

        - ``logprob = sum_d [log N(u_d; mean_d, exp(log_std_d)) - log(1 - tanh(u_d)^2)]``, the
          log-det taken as ``2 * (log 2 - u - softplus(-2u))``, exact and finite for every finite
          u (SB3's ``log(1 - a^2 + 1e-6)`` stops at ``log(1e-6)`` near the bounds). Without
          ``pre_tanh``, ``u = atanh(clamp(a, -1 + eps, 1 - eps))`` with eps the machine epsilon of
          the compute dtype (float32 for float32, bfloat16 and float16, float64 for float64), as
          SB3's ``TanhBijector.inverse``: an action at +-1 gives ``|u| = 8.32`` in float32 (18.37
          in float64) instead of an infinite one.
        - ``entropy``: the entropy of the Gaussian before the squash, ``sum_d (0.5 + 0.5 log(2 pi)
          + log_std_d)``. The squashed distribution has no closed-form entropy; this is an upper
          bound of it (the log-det is <= 0) with the same gradient as the one-sample estimate
          ``H(Gaussian) + sum_d log(1 - tanh(u_d)^2)`` at a stored sample (which is constant in
          the parameters). SB3's ``SquashedDiagGaussianDistribution`` returns no entropy and PPO
          then uses ``-logprob``; pass ``-logprob`` to ``ppo_loss`` for that estimate.

    Backward: the gradients with respect to ``mean`` and ``log_std`` are the Gaussian's at ``u``
    (the log-det depends on ``u`` alone), in one pass; a shared ``log_std``'s gradient is summed
    over rows in a fixed order. bfloat16 / float16 inputs go through float32 copies, as in
    :func:`normal_logprob_entropy`.
    """
    fn = "fastppo.tanh_normal_logprob_entropy"
    _check_normal(fn, mean, log_std, actions)
    if pre_tanh is not None:
        B.require_like(fn, "pre_tanh", pre_tanh, mean, "mean")
    if mean.dtype in _LOW_PRECISION:
        logprob, entropy = tanh_normal_logprob_entropy(mean.float(), log_std.float(), actions.float(),
                                                       None if pre_tanh is None else pre_tanh.float())
        return logprob.to(mean.dtype), entropy.to(mean.dtype)
    if torch.compiler.is_compiling():
        return _tanh_normal_op(mean, log_std, actions, pre_tanh)
    if not (torch.is_grad_enabled() and (mean.requires_grad or log_std.requires_grad)):
        return _normal_forward(mean, log_std, actions, True, pre_tanh)
    return _TanhNormal.apply(mean, log_std, actions, pre_tanh)
