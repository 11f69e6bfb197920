"""Fused policy heads: categorical and diagonal-Gaussian log-prob and entropy.

Same layering as ``loss.py``: raw calls into ``fastppo._C``; an ``autograd.Function`` per head for
eager mode; custom ops (forward and backward, each with a fake implementation) for
``torch.compile``; and the public functions, which check their arguments.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

from typing import Optional, Tuple

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


def _categorical_forward(logits: Tensor, actions: Tensor, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    rows2d, flat_actions = _categorical_views(logits, actions)
    rows, A = rows2d.shape
    logprob, entropy, stats = _categorical_outputs(logits, rows)
    _C.categorical_forward(
        rows, A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), B.spec(flat_actions), B.DTYPE_NAMES[actions.dtype],
        temperature, logprob.data_ptr(), entropy.data_ptr(), stats.data_ptr(), *B.device_stream(logits),
    )
    return logprob.reshape(actions.shape), entropy.reshape(actions.shape), stats


def _grad_as(grad: Optional[Tensor], logits: Tensor) -> Optional[Tensor]:
    """An incoming gradient as the kernel reads it: ``[rows]`` in the logits' dtype (autograd hands
    it over in the output's dtype, which is that one; a reshape or cast may copy: the caller holds
    the result through the kernel call)."""
    return None if grad is None else grad.reshape(-1).to(logits.dtype)


def _categorical_backward(logits: Tensor, actions: Tensor, temperature: float, stats: Tensor,
                          grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    rows2d, flat_actions = _categorical_views(logits, actions)
    A = rows2d.shape[1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g_lp, g_ent = _grad_as(grad_logprob, logits), _grad_as(grad_entropy, logits)
    stats = stats.contiguous()
    _C.categorical_backward(
        rows2d.shape[0], A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), B.spec(flat_actions),
        B.DTYPE_NAMES[actions.dtype], temperature, stats.data_ptr(), B.spec(g_lp), B.spec(g_ent),
        grad_logits.data_ptr(), *B.device_stream(logits),
    )
    return grad_logits


class _Categorical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, actions, temperature):
        logprob, entropy, stats = _categorical_forward(logits, actions, temperature)
        ctx.save_for_backward(logits, actions, stats)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None
        logits, actions, stats = ctx.saved_tensors
        return _categorical_backward(logits, actions, ctx.temperature, stats, grad_logprob, grad_entropy), None, None


@torch.library.custom_op("fastppo::categorical_logprob_entropy", mutates_args=())
def _categorical_op(logits: Tensor, actions: Tensor, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, stats = _categorical_forward(logits, actions, temperature)
    return logprob, entropy, stats


@_categorical_op.register_fake
def _categorical_fake(logits, actions, temperature):
    rows = actions.numel()
    stats = logits.new_empty((2, rows), dtype=_acc_dtype(logits.dtype))
    return logits.new_empty(actions.shape), logits.new_empty(actions.shape), stats


@torch.library.custom_op("fastppo::categorical_backward", mutates_args=())
def _categorical_backward_op(logits: Tensor, actions: Tensor, temperature: float, stats: Tensor,
                             grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    return _categorical_backward(logits, actions, temperature, stats, grad_logprob, grad_entropy)


@_categorical_backward_op.register_fake
def _categorical_backward_fake(logits, actions, temperature, stats, grad_logprob, grad_entropy):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _categorical_setup(ctx, inputs, output):
    logits, actions, temperature = inputs
    ctx.save_for_backward(logits, actions, output[2])
    ctx.temperature = temperature


def _categorical_op_backward(ctx, grad_logprob, grad_entropy, _grad_stats):
    logits, actions, stats = ctx.saved_tensors
    return _categorical_backward_op(logits, actions, ctx.temperature, stats, grad_logprob, grad_entropy), None, None


_categorical_op.register_autograd(_categorical_op_backward, setup_context=_categorical_setup)


def _check_logits(fn: str, logits) -> None:
    """``[..., A]`` logits, A >= 1, of a dtype the heads take on their device."""
    B.require_array(fn, "logits", logits, "torch", _LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape [..., A] with A >= 1, got {tuple(logits.shape)}")
    B.check_device(fn, "logits", logits)


def categorical_logprob_entropy(logits: Tensor, actions: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Log-prob of the taken actions and entropy of a categorical policy, fused.

    Args:
        logits: ``[..., A]`` unnormalized log-probabilities; float32, float64, bfloat16 or float16,
            on the CPU or CUDA. Differentiable. ``-inf`` marks an action that cannot be taken. The
            last dimension may be strided. bfloat16 and float16 logits are read as they are stored
            (no float32 copy of them is made, in forward or backward) and every sum (max,
            log-sum-exp, entropy) is taken in float32.
        actions: ``[...]`` int64 or int32 indices in ``[0, A)``.
        temperature: > 0; the distribution is ``softmax(logits / temperature)`` (RLHF sampling).

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
    if torch.compiler.is_compiling():
        logprob, entropy, _ = _categorical_op(logits, actions, temperature)
        return logprob, entropy
    try:
        if not (torch.is_grad_enabled() and logits.requires_grad):  # inference (a rollout): no graph to build
            logprob, entropy, _ = _categorical_forward(logits, actions, temperature)
            return logprob, entropy
        return _Categorical.apply(logits, actions, temperature)
    except IndexError as err:  # from the CPU kernel's check: say which value and the range
        bad = actions[(actions < 0) | (actions >= logits.shape[-1])]
        raise IndexError(
            f"{fn}: actions holds {bad[0].item()} (and {bad.numel() - 1} more out of range); expected indices in "
            f"[0, {logits.shape[-1]}), the size of the last dimension of logits"
        ) from err


def categorical_sample(logits: Tensor, temperature: float = 1.0,
                       generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Samples one action per row of a categorical policy and returns it with its log-prob and the
    entropy, from one fused call: what ``get_action_and_value`` needs during a rollout, without a
    ``torch.distributions.Categorical``.

    Args:
        logits: ``[..., A]`` float32, float64, bfloat16 or float16, CPU or CUDA. The noise and
            the scores are float32 for bfloat16 / float16 logits (the logits are not copied).
        temperature: > 0; samples from ``softmax(logits / temperature)``.
        generator: the ``torch.Generator`` that draws the uniform noise (on the logits' device);
            None: torch's default generator, so ``torch.manual_seed`` makes runs repeatable.

    Returns:
        ``(action, logprob, entropy)``: int64 ``[...]``, and ``[...]`` each (in the logits' dtype)
        as :func:`categorical_logprob_entropy` gives them for that action.

    Sampling is Gumbel-max, ``argmax(logits / T - log(-log u))`` with ``u`` uniform ``[..., A]``
    from ``generator``: one ``torch.rand`` and, on the CPU, one kernel for the argmax, the log-prob
    and the entropy (on CUDA the argmax is a torch op, then the fused head). When autograd records
    (``logits.requires_grad``), ``logprob`` and ``entropy`` are differentiable w.r.t. ``logits``
    exactly as from :func:`categorical_logprob_entropy`.

    A masked action (a ``-inf`` logit next to a finite one) is never sampled. A row without a
    distribution (a NaN or ``+inf`` logit, or only ``-inf`` logits), which
    ``torch.distributions.Categorical`` refuses, still gets an index in ``[0, A)``, whatever the
    noise and on every path: the argmax is ``torch.argmax``'s, so the first NaN logit, else the
    first ``+inf`` one, else 0 for a row of only ``-inf``; its log-prob and entropy are NaN (see
    :func:`categorical_logprob_entropy`), which marks the row downstream.
    """
    fn = "fastppo.categorical_sample"
    _check_logits(fn, logits)
    temperature = B.require_real(fn, "temperature", temperature, "a finite number > 0", 0.0, open_low=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device != logits.device:
        raise ValueError(f"{fn}: generator is on {generator.device} but logits is on {logits.device}; expected one device")
    acc = _acc_dtype(logits.dtype)
    noise = torch.rand(logits.shape, generator=generator, dtype=acc, device=logits.device)
    records = torch.is_grad_enabled() and logits.requires_grad
    if logits.is_cuda or records or torch.compiler.is_compiling():
        with torch.no_grad():
            # -log(-log u) + logits / T, in place in the noise: the logits are read, never copied
            # (a bfloat16 / float16 logit is widened as the addition reads it).
            scores = noise.clamp_(min=torch.finfo(acc).tiny).log_().neg_().log_().neg_()
            action = scores.add_(logits, alpha=1.0 / temperature).argmax(-1)
        logprob, entropy = categorical_logprob_entropy(logits, action, temperature)
        return action, logprob, entropy
    rows2d = logits.detach().reshape(-1, logits.shape[-1])
    rows, A = rows2d.shape
    action = torch.empty(rows, dtype=torch.int64)
    logprob, entropy, stats = _categorical_outputs(logits, rows)
    _C.categorical_sample(rows, A, B.DTYPE_NAMES[logits.dtype], B.spec(rows2d), noise.data_ptr(), A, temperature,
                          action.data_ptr(), logprob.data_ptr(), entropy.data_ptr(), stats.data_ptr())
    shape = logits.shape[:-1]
    return action.reshape(shape), logprob.reshape(shape), entropy.reshape(shape)


# ------------------------------------------------------------------ diagonal Gaussian


def _normal_views(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``[rows, D]`` mean and actions, and log_std as ``[D]`` (shared) or ``[rows, D]``; views where
    the strides allow (the caller holds them through the kernel call: a reshape may copy)."""
    D = mean.shape[-1]
    if log_std.dim() != 1:
        log_std = log_std.reshape(-1, D)
        if log_std.stride(0) == 0:  # a [D] log_std expanded over rows (CleanRL's expand_as): its gradient is per row
            log_std = torch.empty(log_std.shape, dtype=log_std.dtype, device=log_std.device).copy_(log_std)
    return mean.reshape(-1, D), log_std, actions.reshape(-1, D)


def _normal_forward(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
    views = _normal_views(mean, log_std, actions)
    rows, D = views[0].shape
    logprob = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    entropy = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    _C.normal_forward(rows, D, B.DTYPE_NAMES[mean.dtype], *map(B.row_spec, views), logprob.data_ptr(),
                      entropy.data_ptr(), *B.device_stream(mean))
    return logprob, entropy


def _normal_backward(mean: Tensor, log_std: Tensor, actions: Tensor, grad_logprob: Optional[Tensor],
                     grad_entropy: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
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
    _C.normal_backward(
        rows, D, B.DTYPE_NAMES[mean.dtype], *map(B.row_spec, views), B.spec(g_lp), B.spec(g_ent),
        grad_mean.data_ptr(), grad_log_std.data_ptr(), None if workspace is None else workspace.data_ptr(),
        *B.device_stream(mean),
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
    B.require_array(fn, "mean", mean, "torch", B.FLOAT_DTYPES + B.LOW_PRECISION_DTYPES)
    if mean.dim() < 1 or mean.shape[-1] < 1:
        raise ValueError(f"{fn}: mean must have shape [..., D] with D >= 1, got {tuple(mean.shape)}")
    B.require_like(fn, "actions", actions, mean, "mean")
    shared = getattr(log_std, "ndim", None) == 1  # anything but a tensor is refused next
    B.require_like(fn, "log_std", log_std, mean, "mean", shape=mean.shape[-1:] if shared else None,
                   shape_what="mean.shape[-1:] (shared by every row) or mean.shape (per row)")
    B.check_device(fn, "mean", mean)
    if mean.dtype in _LOW_PRECISION:  # per-row work: a float32 copy of the inputs costs little
        logprob, entropy = normal_logprob_entropy(mean.float(), log_std.float(), actions.float())
        return logprob.to(mean.dtype), entropy.to(mean.dtype)
    if torch.compiler.is_compiling():
        return _normal_op(mean, log_std, actions)
    if not (torch.is_grad_enabled() and (mean.requires_grad or log_std.requires_grad)):
        return _normal_forward(mean, log_std, actions)  # inference: no graph to build
    return _Normal.apply(mean, log_std, actions)
