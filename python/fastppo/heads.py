"""Fused policy heads: categorical and diagonal-Gaussian log-prob and entropy.

Same layering as ``loss.py``: raw calls into ``fastppo._C``; an ``autograd.Function`` per head for
eager mode; custom ops (forward and backward, each with a fake implementation) for
``torch.compile``; and the public functions, which check their arguments.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C

_LOGIT_DTYPES_CPU = (torch.float32, torch.float64)
_LOGIT_DTYPES_CUDA = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ACTION_DTYPES = (torch.int64, torch.int32)
_NAMES = {d: str(d).removeprefix("torch.") for d in _LOGIT_DTYPES_CUDA + _ACTION_DTYPES}


def _device_args(x: Tensor) -> Tuple[int, int]:
    if x.device.type == "cuda":
        return x.device.index, torch.cuda.current_stream(x.device).cuda_stream
    return -1, 0


def _vector(x: Optional[Tensor]):
    """(data, stride) of a 1-D view of x, or None."""
    if x is None:
        return None
    flat = x.reshape(-1)
    return (flat.data_ptr(), flat.stride(0)), flat


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ categorical: raw calls


def _categorical_views(logits: Tensor, actions: Tensor):
    """``[rows, A]`` logits and ``[rows]`` actions, as views where the strides allow."""
    return logits.reshape(-1, logits.shape[-1]), actions.reshape(-1)


def _categorical_forward(logits: Tensor, actions: Tensor, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    rows2d, flat_actions = _categorical_views(logits, actions)
    rows, A = rows2d.shape
    acc = _acc_dtype(logits.dtype)
    logprob = torch.empty(rows, dtype=acc, device=logits.device)
    entropy = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    _C.categorical_forward(
        rows, A, _NAMES[logits.dtype], (rows2d.data_ptr(), rows2d.stride(0), rows2d.stride(1)),
        (flat_actions.data_ptr(), flat_actions.stride(0)), _NAMES[actions.dtype], temperature,
        logprob.data_ptr(), entropy.data_ptr(), lse.data_ptr(), *_device_args(logits),
    )
    return logprob.reshape(actions.shape), entropy.reshape(actions.shape), lse


def _categorical_backward(logits: Tensor, actions: Tensor, temperature: float, lse: Tensor, entropy: Tensor,
                          grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    rows2d, flat_actions = _categorical_views(logits, actions)
    A = rows2d.shape[1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    g_lp, g_ent = _vector(grad_logprob), _vector(grad_entropy)
    _C.categorical_backward(
        rows2d.shape[0], A, _NAMES[logits.dtype], (rows2d.data_ptr(), rows2d.stride(0), rows2d.stride(1)),
        (flat_actions.data_ptr(), flat_actions.stride(0)), _NAMES[actions.dtype], temperature,
        lse.data_ptr(), entropy.reshape(-1).data_ptr(), None if g_lp is None else g_lp[0],
        None if g_ent is None else g_ent[0], grad_logits.data_ptr(), *_device_args(logits),
    )
    return grad_logits


class _Categorical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, actions, temperature):
        logprob, entropy, lse = _categorical_forward(logits, actions, temperature)
        ctx.save_for_backward(logits, actions, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        if grad_logprob is None and grad_entropy is None:
            return None, None, None
        logits, actions, lse, entropy = ctx.saved_tensors
        return _categorical_backward(logits, actions, ctx.temperature, lse, entropy, grad_logprob, grad_entropy), None, None


@torch.library.custom_op("fastppo::categorical_logprob_entropy", mutates_args=())
def _categorical_op(logits: Tensor, actions: Tensor, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    logprob, entropy, lse = _categorical_forward(logits, actions, temperature)
    return logprob, entropy, lse


@_categorical_op.register_fake
def _categorical_fake(logits, actions, temperature):
    acc = _acc_dtype(logits.dtype)
    rows = actions.numel()
    return actions.new_empty(actions.shape, dtype=acc), actions.new_empty(actions.shape, dtype=acc), actions.new_empty(rows, dtype=acc)


@torch.library.custom_op("fastppo::categorical_backward", mutates_args=())
def _categorical_backward_op(logits: Tensor, actions: Tensor, temperature: float, lse: Tensor, entropy: Tensor,
                             grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor]) -> Tensor:
    return _categorical_backward(logits, actions, temperature, lse, entropy, grad_logprob, grad_entropy)


@_categorical_backward_op.register_fake
def _categorical_backward_fake(logits, actions, temperature, lse, entropy, grad_logprob, grad_entropy):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _categorical_setup(ctx, inputs, output):
    logits, actions, temperature = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, actions, lse, entropy)
    ctx.temperature = temperature


def _categorical_op_backward(ctx, grad_logprob, grad_entropy, _grad_lse):
    logits, actions, lse, entropy = ctx.saved_tensors
    return _categorical_backward_op(logits, actions, ctx.temperature, lse, entropy, grad_logprob, grad_entropy), None, None


_categorical_op.register_autograd(_categorical_op_backward, setup_context=_categorical_setup)


def categorical_logprob_entropy(logits: Tensor, actions: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Log-prob of the taken actions and entropy of a categorical policy, fused.

    Args:
        logits: ``[..., A]`` unnormalized log-probabilities; float32/float64 (CPU and CUDA), or
            bfloat16/float16 on CUDA (accumulated in float32). Differentiable. ``-inf`` marks an
            action that cannot be taken. The last dimension may be strided.
        actions: ``[...]`` int64 or int32 indices in ``[0, A)``.
        temperature: > 0; the distribution is ``softmax(logits / temperature)`` (RLHF sampling).

    Returns:
        ``(logprob, entropy)``, each ``[...]``: ``log softmax(logits / T)[action]`` and
        ``-sum p log p``; float32 for bf16/f16 logits, else the logits' dtype.

    One streaming pass per row (online softmax): no ``log_softmax`` of the logits is made in
    forward, and backward writes ``grad_logits`` from the saved per-row log-sum-exp and entropy,
    so memory beyond the inputs and ``grad_logits`` is O(rows). An action out of range raises
    ``IndexError`` on CPU; on CUDA (where checking would sync with the host) that row's log-prob
    and entropy are NaN and its gradient 0.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"fastppo.categorical_logprob_entropy: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(actions, Tensor):
        raise TypeError(f"fastppo.categorical_logprob_entropy: actions must be a torch.Tensor, got {type(actions).__name__}")
    fn = "fastppo.categorical_logprob_entropy"
    cuda = logits.device.type == "cuda"
    allowed = _LOGIT_DTYPES_CUDA if cuda else _LOGIT_DTYPES_CPU
    if logits.dtype not in allowed:
        what = "float32, float64, bfloat16 or float16" if cuda else "float32 or float64 on the CPU (bfloat16/float16 on CUDA)"
        raise TypeError(f"{fn}: logits has dtype {logits.dtype}; expected {what}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape [..., A] with A >= 1, got {tuple(logits.shape)}")
    if actions.dtype not in _ACTION_DTYPES:
        raise TypeError(f"{fn}: actions has dtype {actions.dtype}; expected torch.int64 or torch.int32 (use actions.long())")
    if actions.shape != logits.shape[:-1]:
        raise ValueError(f"{fn}: actions has shape {tuple(actions.shape)}; expected {tuple(logits.shape[:-1])}, logits.shape[:-1]")
    if actions.device != logits.device:
        raise ValueError(f"{fn}: actions is on {actions.device} but logits is on {logits.device}; expected one device")
    _check_device(fn, "logits", logits)
    temperature = _positive(fn, "temperature", temperature)
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
        logits: ``[..., A]`` float32/float64 (bfloat16/float16 on CUDA), CPU or CUDA.
        temperature: > 0; samples from ``softmax(logits / temperature)``.
        generator: the ``torch.Generator`` that draws the uniform noise (on the logits' device);
            None: torch's default generator, so ``torch.manual_seed`` makes runs repeatable.

    Returns:
        ``(action, logprob, entropy)``: int64 ``[...]``, and ``[...]`` each as
        :func:`categorical_logprob_entropy` gives them for that action.

    Sampling is Gumbel-max, ``argmax(logits / T - log(-log u))`` with ``u`` uniform ``[..., A]``
    from ``generator``: one ``torch.rand`` and, on the CPU, one kernel for the argmax, the log-prob
    and the entropy (on CUDA the argmax is a torch op, then the fused head). When autograd records
    (``logits.requires_grad``), ``logprob`` and ``entropy`` are differentiable w.r.t. ``logits``
    exactly as from :func:`categorical_logprob_entropy`.
    """
    fn = "fastppo.categorical_sample"
    if not isinstance(logits, Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    cuda = logits.device.type == "cuda"
    if logits.dtype not in (_LOGIT_DTYPES_CUDA if cuda else _LOGIT_DTYPES_CPU):
        what = "float32, float64, bfloat16 or float16" if cuda else "float32 or float64 on the CPU (bfloat16/float16 on CUDA)"
        raise TypeError(f"{fn}: logits has dtype {logits.dtype}; expected {what}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have shape [..., A] with A >= 1, got {tuple(logits.shape)}")
    _check_device(fn, "logits", logits)
    temperature = _positive(fn, "temperature", temperature)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device != logits.device):
        raise ValueError(f"{fn}: generator must be a torch.Generator on {logits.device}, got {generator!r}")
    acc = _acc_dtype(logits.dtype)
    noise = torch.rand(logits.shape, generator=generator, dtype=acc, device=logits.device)
    records = torch.is_grad_enabled() and logits.requires_grad
    if cuda or records or torch.compiler.is_compiling():
        with torch.no_grad():
            scores = logits.to(acc) / temperature - torch.log(-torch.log(noise.clamp_(min=torch.finfo(acc).tiny)))
            action = scores.argmax(-1)
        logprob, entropy = categorical_logprob_entropy(logits, action, temperature)
        return action, logprob, entropy
    rows2d = logits.detach().reshape(-1, logits.shape[-1])
    rows, A = rows2d.shape
    action = torch.empty(rows, dtype=torch.int64)
    logprob, entropy, lse = (torch.empty(rows, dtype=acc) for _ in range(3))
    _C.categorical_sample(rows, A, _NAMES[logits.dtype], (rows2d.data_ptr(), rows2d.stride(0), rows2d.stride(1)),
                          noise.data_ptr(), A, temperature, action.data_ptr(), logprob.data_ptr(), entropy.data_ptr(),
                          lse.data_ptr())
    shape = logits.shape[:-1]
    return action.reshape(shape), logprob.reshape(shape), entropy.reshape(shape)


# ------------------------------------------------------------------ diagonal Gaussian


def _normal_specs(mean: Tensor, log_std: Tensor, actions: Tensor):
    D = mean.shape[-1]
    m = mean.reshape(-1, D)
    a = actions.reshape(-1, D)
    if log_std.dim() == 1:
        ls_spec = (log_std.data_ptr(), 0, log_std.stride(0))
        ls = log_std
    else:
        ls = log_std.reshape(-1, D)
        if ls.stride(0) == 0:  # a [D] log_std expanded over rows (CleanRL's expand_as): its gradient is per row
            ls = torch.empty(ls.shape, dtype=ls.dtype, device=ls.device).copy_(ls)
        ls_spec = (ls.data_ptr(), ls.stride(0), ls.stride(1))
    specs = ((m.data_ptr(), m.stride(0), m.stride(1)), ls_spec, (a.data_ptr(), a.stride(0), a.stride(1)))
    return m.shape[0], D, specs, (m, ls, a)


def _normal_forward(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tuple[Tensor, Tensor]:
    rows, D, specs, _views = _normal_specs(mean, log_std, actions)
    logprob = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    entropy = torch.empty(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    _C.normal_forward(rows, D, _NAMES[mean.dtype], *specs, logprob.data_ptr(), entropy.data_ptr(), *_device_args(mean))
    return logprob, entropy


def _normal_backward(mean: Tensor, log_std: Tensor, actions: Tensor, grad_logprob: Optional[Tensor],
                     grad_entropy: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    rows, D, specs, _views = _normal_specs(mean, log_std, actions)
    grad_mean = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    grad_log_std = torch.empty(log_std.shape, dtype=mean.dtype, device=mean.device)
    size = _C.normal_backward_workspace(rows, D, log_std.dim() == 1)
    workspace = torch.empty(size, dtype=torch.float64, device=mean.device) if size else None
    g_lp, g_ent = _vector(grad_logprob), _vector(grad_entropy)
    _C.normal_backward(
        rows, D, _NAMES[mean.dtype], *specs, None if g_lp is None else g_lp[0], None if g_ent is None else g_ent[0],
        grad_mean.data_ptr(), grad_log_std.data_ptr(), None if workspace is None else workspace.data_ptr(),
        *_device_args(mean),
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
        mean: ``[..., D]`` float32/float64; differentiable.
        log_std: ``[D]`` (one log-std shared by every row, as CleanRL's continuous agent learns it)
            or ``[..., D]`` like ``mean``; same dtype; differentiable. A shared log_std's gradient
            is summed over rows in a fixed order (the same bits every run).
        actions: ``[..., D]`` like ``mean``.

    Returns:
        ``(logprob, entropy)``, each ``[...]``: ``sum_d log N(a_d; mean_d, exp(log_std_d))`` and
        ``sum_d (0.5 + 0.5 log(2 pi) + log_std_d)``.
    """
    fn = "fastppo.normal_logprob_entropy"
    for name, x in (("mean", mean), ("log_std", log_std), ("actions", actions)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if mean.dtype not in _LOGIT_DTYPES_CPU:
        raise TypeError(f"{fn}: mean has dtype {mean.dtype}; expected torch.float32 or torch.float64")
    if mean.dim() < 1 or mean.shape[-1] < 1:
        raise ValueError(f"{fn}: mean must have shape [..., D] with D >= 1, got {tuple(mean.shape)}")
    for name, x in (("log_std", log_std), ("actions", actions)):
        if x.dtype != mean.dtype:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected {mean.dtype}, the dtype of mean")
        if x.device != mean.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but mean is on {mean.device}; expected one device")
    if actions.shape != mean.shape:
        raise ValueError(f"{fn}: actions has shape {tuple(actions.shape)}; expected {tuple(mean.shape)}, the shape of mean")
    if log_std.shape != mean.shape and log_std.shape != mean.shape[-1:]:
        raise ValueError(
            f"{fn}: log_std has shape {tuple(log_std.shape)}; expected {tuple(mean.shape[-1:])} (shared) "
            f"or {tuple(mean.shape)} (per row)"
        )
    _check_device(fn, "mean", mean)
    if torch.compiler.is_compiling():
        return _normal_op(mean, log_std, actions)
    if not (torch.is_grad_enabled() and (mean.requires_grad or log_std.requires_grad)):
        return _normal_forward(mean, log_std, actions)  # inference: no graph to build
    return _Normal.apply(mean, log_std, actions)


# ------------------------------------------------------------------ checks


def _check_device(fn: str, name: str, x: Tensor) -> None:
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: {name} is on {x.device}; fastppo runs on cpu and cuda devices")
    if x.device.type == "cuda" and not _C.WITH_CUDA:
        raise ValueError(f"{fn}: {name} is on {x.device} but this build of fastppo has no CUDA support")


def _positive(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number > 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return value
