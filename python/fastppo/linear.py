"""Log-prob, entropy and the PPO loss straight from a language model's hidden states and LM head
(``fastppo.linear_logprob_entropy``, ``fastppo.linear_ppo_loss``), never holding the
``[tokens, V]`` logits.

The tokens are taken in chunks of rows. Each chunk's logits ``hidden[rows] @ weight.T + bias`` come
from one GEMM made by ``torch.matmul`` / ``torch.addmm`` on the tensors' device, that is by the BLAS
the caller's torch ships (MKL / oneDNN on the CPU, cuBLAS on CUDA): the compiled core has no GEMM
of its own and stays libtorch-free. fastppo's categorical head (``categorical_logprob_entropy``)
turns the chunk's ``[rows, V]`` logits into log-prob and entropy, and its backward gives their
gradient with respect to the logits, which two more GEMMs turn into ``d hidden`` (written per chunk)
and ``d weight`` (accumulated over the chunks). Memory beyond the inputs, the outputs and the
gradients is a few chunks of logits.

This module holds the chunk machinery that ``linear_loss.py`` (``linear_ppo_loss``) shares, and
``linear_logprob_entropy``. Layers as in loss.py and heads.py: the chunk loops (``_forward``,
``_backward``); an ``autograd.Function`` for eager mode; ``torch.library`` custom ops with
their fakes and autograd registrations for ``torch.compile``; the public function, which checks
its arguments. Only public functions of the other modules are called (the head, ``ppo_loss`` and
its output type), and their gradients are taken with ``torch.autograd.grad``.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _buffers as B
from .heads import categorical_logprob_entropy

_FN = "fastppo.linear_logprob_entropy"
_DTYPES = ("float32", "float64", "bfloat16", "float16")
_LOW_PRECISION = (torch.bfloat16, torch.float16)

CHUNK_LOGIT_BYTES = 128 << 20
"""The default chunk: as many rows as make about this many bytes of float32 logits (128 MiB)."""



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-probs and of everything the head and the loss compute."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(chunk_size: Optional[int], V: int) -> int:
    """Rows (tokens) per chunk: ``chunk_size``, or with None as many as make about
    ``CHUNK_LOGIT_BYTES`` (128 MiB) of float32 logits, ``max(1, 2**27 // (4 * V))``."""
    return chunk_size if chunk_size is not None else max(1, CHUNK_LOGIT_BYTES // (4 * V))


# ------------------------------------------------------------------ one chunk


def _as_rows(hidden: Tensor, targets: Tensor, mask: Optional[Tensor]):
    """``[N, H]`` hidden (a view where the strides allow), ``[N]`` targets and ``[N]`` bool mask."""
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), None if mask is None else mask.reshape(-1) != 0


def _check_targets(fn: str, targets: Tensor, V: int, selected: Optional[Tensor]) -> None:
    """A selected target outside ``[0, V)`` is an IndexError on the CPU (where checking costs one pass
    over the targets and no device sync); on CUDA its row's log-prob is NaN, as the head documents."""
    if targets.is_cuda or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= V)
    if selected is not None:
        bad &= selected
    if bool(bad.any()):
        values = targets[bad]
        raise IndexError(f"{fn}: targets holds {values[0].item()} (and {values.numel() - 1} more out of range); "
                         f"expected indices in [0, {V}), the rows of weight")


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], selected: Optional[Tensor]):
    """``(hidden rows used, logits)`` of one chunk: the GEMM (torch's BLAS) in the inputs' dtype, its
    result upcast to float32 for the head when that is bf16/fp16 (a chunk-sized copy). A masked row's
    hidden state is replaced by 0 first, so whatever it holds (NaN padding) gives finite logits, a
    zero gradient and no contribution to ``d weight``."""
    if selected is not None:
        hidden = torch.where(selected.unsqueeze(1), hidden, hidden.new_zeros(()))
    logits = torch.matmul(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    return hidden, logits


def _chunk_targets(targets: Tensor, selected: Optional[Tensor]) -> Tensor:
    """A masked token's target may be anything (an ignore index like -100): 0 is read instead."""
    return targets if selected is None else torch.where(selected, targets, targets.new_zeros(()))


def _apply_logit_grad(grad_logits: Tensor, hidden: Tensor, weight: Tensor, start: int,
                      d_hidden: Optional[Tensor], d_weight: Optional[Tensor], d_bias: Optional[Tensor]) -> None:
    """The two gradient GEMMs of a chunk: ``d hidden[rows] = g @ weight`` and ``d weight += g.T @ hidden``
    (in place, no ``[V, H]`` temporary), and ``d bias += g.sum(0)``. ``g`` is cast to the weight's dtype
    for the first (bf16/fp16 GEMMs accumulate in float32 inside the BLAS). ``d weight`` and ``d bias``
    of a bf16/fp16 head are float32 sums (``_zero_grads``): the chunk's GEMM then runs in float32, so
    the sum over chunks is not rounded to 16 bits once per chunk."""
    g = grad_logits.to(weight.dtype)
    if d_hidden is not None:
        torch.mm(g, weight, out=d_hidden[start:start + g.shape[0]])
    if d_weight is not None:
        if d_weight.dtype == weight.dtype:
            d_weight.addmm_(g.t(), hidden)
        else:
            d_weight.addmm_(grad_logits.to(d_weight.dtype).t(), hidden.to(d_weight.dtype))
    if d_bias is not None:
        d_bias += (g if d_bias.dtype == g.dtype else grad_logits).sum(0, dtype=d_bias.dtype)


def _zero_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs: Tuple[bool, bool, bool]):
    """Zero-filled ``(d hidden [N, H], d weight, d bias)``, each None where not needed; d weight and
    d bias are summed over the chunks in float32 for a bf16/fp16 head (``_grads_in_dtype`` rounds
    them once at the end)."""
    N, H = hidden.numel() // max(hidden.shape[-1], 1), hidden.shape[-1]
    d_hidden = hidden.new_zeros((N, H)) if needs[0] else None
    d_weight = (torch.zeros_like(weight, dtype=_acc_dtype(weight.dtype), memory_format=torch.contiguous_format)
                if needs[1] else None)
    d_bias = torch.zeros_like(bias, dtype=_acc_dtype(bias.dtype)) if needs[2] and bias is not None else None
    return d_hidden, d_weight, d_bias


def _grads_in_dtype(d_weight: Optional[Tensor], weight: Tensor, d_bias: Optional[Tensor],
                    bias: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The float32 sums of a bf16/fp16 head's gradients rounded once to its dtype."""
    return (None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


# ------------------------------------------------------------------ linear_logprob_entropy: the loops


def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
             temperature: float, want_entropy: bool, rows: int) -> Tuple[Tensor, Tensor]:
    """``(logprob, entropy)`` shaped like ``targets`` (entropy ``[0]`` when not wanted), one GEMM
    and one head call per chunk of ``rows`` tokens; masked tokens get 0."""
    h2, t1, selected = _as_rows(hidden, targets, mask)
    _check_targets(_FN, t1, weight.shape[0], selected)
    N = t1.numel()
    acc = _acc_dtype(hidden.dtype)
    logprob = h2.new_zeros(N, dtype=acc)
    entropy = h2.new_zeros(N if want_entropy else 0, dtype=acc)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        sel = None if selected is None else selected[start:stop]
        _, logits = _chunk_logits(h2[start:stop], weight, bias, sel)
        lp, ent = categorical_logprob_entropy(logits, _chunk_targets(t1[start:stop], sel), temperature)
        del logits  # before the next chunk's GEMM: one chunk of logits alive at a time
        zero = lp.new_zeros(())
        logprob[start:stop] = lp if sel is None else torch.where(sel, lp, zero)
        if want_entropy:
            entropy[start:stop] = ent if sel is None else torch.where(sel, ent, zero)
    return logprob.reshape(targets.shape), entropy.reshape(targets.shape) if want_entropy else entropy


def _chunk_logit_grad(h: Tensor, weight: Tensor, bias: Optional[Tensor], t: Tensor, sel: Optional[Tensor],
                      temperature: float, g_lp: Optional[Tensor], g_ent: Optional[Tensor]):
    """``(hidden rows used, d loss / d logits)`` of one chunk: its logits recomputed, the head's
    forward and, through ``torch.autograd.grad``, its backward with the incoming gradients (0 at masked
    tokens)."""
    h, logits = _chunk_logits(h, weight, bias, sel)
    logits.requires_grad_(True)
    with torch.enable_grad():
        lp, ent = categorical_logprob_entropy(logits, _chunk_targets(t, sel), temperature)
    outputs, grads = [], []
    for out, g in ((lp, g_lp), (ent, g_ent)):
        if g is not None:
            outputs.append(out)
            grads.append(g.to(out.dtype) if sel is None else torch.where(sel, g.to(out.dtype), out.new_zeros(())))
    (grad_logits,) = torch.autograd.grad(outputs, logits, grads)
    return h, grad_logits


def _backward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
              temperature: float, rows: int, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
              needs: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(d hidden, d weight, d bias)`` (None where not needed): per chunk the logits recomputed, the
    head's backward, and the two gradient GEMMs."""
    h2, t1, selected = _as_rows(hidden, targets, mask)
    d_hidden, d_weight, d_bias = _zero_grads(hidden, weight, bias, needs)
    g_lp = None if grad_logprob is None else grad_logprob.reshape(-1)
    g_ent = None if grad_entropy is None else grad_entropy.reshape(-1)
    if g_lp is not None or g_ent is not None:
        for start in range(0, t1.numel(), rows):
            stop = min(t1.numel(), start + rows)
            sel = None if selected is None else selected[start:stop]
            h, g = _chunk_logit_grad(h2[start:stop], weight, bias, t1[start:stop], sel, temperature,
                                     None if g_lp is None else g_lp[start:stop],
                                     None if g_ent is None else g_ent[start:stop])
            _apply_logit_grad(g, h, weight, start, d_hidden, d_weight, d_bias)
            del h, g  # before the next chunk's GEMM
    d_weight, d_bias = _grads_in_dtype(d_weight, weight, d_bias, bias)
    return None if d_hidden is None else d_hidden.reshape(hidden.shape), d_weight, d_bias


# ------------------------------------------------------------------ linear_logprob_entropy: eager


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, mask, temperature, want_entropy, rows):
        logprob, entropy = _forward(hidden, weight, targets, bias, mask, temperature, want_entropy, rows)
        ctx.save_for_backward(hidden, weight, targets, bias, mask)
        ctx.temperature, ctx.want_entropy, ctx.rows = temperature, want_entropy, rows
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, bias, mask = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        d_hidden, d_weight, d_bias = _backward(
            hidden, weight, targets, bias, mask, ctx.temperature, ctx.rows, grad_logprob,
            grad_entropy if ctx.want_entropy else None, needs)
        return d_hidden, d_weight, None, d_bias, None, None, None, None


# ------------------------------------------------------------------ linear_logprob_entropy: torch.compile


@torch.library.custom_op("fastppo::linear_logprob_entropy", mutates_args=())
def _linear_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               temperature: float, want_entropy: bool, rows: int) -> Tuple[Tensor, Tensor]:
    return _forward(hidden, weight, targets, bias, mask, temperature, want_entropy, rows)


@_linear_op.register_fake
def _linear_fake(hidden, weight, targets, bias, mask, temperature, want_entropy, rows):
    acc = _acc_dtype(hidden.dtype)
    entropy_shape = targets.shape if want_entropy else (0,)
    return targets.new_empty(targets.shape, dtype=acc), targets.new_empty(entropy_shape, dtype=acc)


@torch.library.custom_op("fastppo::linear_logprob_entropy_backward", mutates_args=())
def _linear_backward_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                        mask: Optional[Tensor], temperature: float, rows: int, grad_logprob: Optional[Tensor],
                        grad_entropy: Optional[Tensor], needs_hidden: bool, needs_weight: bool,
                        needs_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grads = _backward(hidden, weight, targets, bias, mask, temperature, rows, grad_logprob, grad_entropy,
                      (needs_hidden, needs_weight, needs_bias))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_linear_backward_op.register_fake
def _linear_backward_fake(hidden, weight, targets, bias, mask, temperature, rows, grad_logprob, grad_entropy,
                          needs_hidden, needs_weight, needs_bias):
    return (hidden.new_empty(hidden.shape if needs_hidden else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            hidden.new_empty(bias.shape if needs_bias and bias is not None else (0,)))


def _linear_setup(ctx, inputs, output):
    hidden, weight, targets, bias, mask, temperature, want_entropy, rows = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, mask)
    ctx.temperature, ctx.want_entropy, ctx.rows = temperature, want_entropy, rows


def _linear_op_backward(ctx, grad_logprob, grad_entropy):
    hidden, weight, targets, bias, mask = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
    d_hidden, d_weight, d_bias = _linear_backward_op(
        hidden, weight, targets, bias, mask, ctx.temperature, ctx.rows, grad_logprob,
        grad_entropy if ctx.want_entropy else None, *needs)
    return (d_hidden if needs[0] else None, d_weight if needs[1] else None, None, d_bias if needs[2] else None,
            None, None, None, None)


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------ argument checks


def _check_linear(fn: str, hidden, weight, targets, bias, mask, temperature, chunk_size) -> Tuple[float, int]:
    """Checks the arguments the two public functions share; returns (temperature, rows per chunk)."""
    B.require_array(fn, "hidden", hidden, "torch", _DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{fn}: hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    B.require_array(fn, "weight", weight, "torch")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{fn}: weight has dtype {weight.dtype}; expected {hidden.dtype}, the dtype of hidden")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{fn}: weight has shape {tuple(weight.shape)}; expected [V, {hidden.shape[-1]}] with "
                         f"V >= 1 (the LM head: vocabulary by hidden.shape[-1])")
    if weight.device != hidden.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but hidden is on {hidden.device}; expected one device")
    B.require_like(fn, "targets", targets, hidden, "hidden", B.INDEX_DTYPES, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        B.require_like(fn, "bias", bias, weight, "weight", None, weight.shape[:1], "[V], weight.shape[:1]")
    if mask is not None:
        B.require_like(fn, "mask", mask, targets, "targets", B.FLAG_DTYPES)
    temperature = B.require_real(fn, "temperature", temperature, "a finite number > 0", 0.0, open_low=True)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{fn}: chunk_size must be None or an int >= 1, got "
                            f"{type(chunk_size).__name__} {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"{fn}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    B.check_device(fn, "hidden", hidden)
    return temperature, chunk_rows(chunk_size, weight.shape[0])


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[bool, bool, bool]:
    """Which of hidden, weight and bias a gradient is wanted for (none under torch.no_grad)."""
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


# ------------------------------------------------------------------ linear_logprob_entropy


def linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    entropy: bool = True,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token log-prob of ``targets`` and entropy under ``softmax((hidden @ weight.T + bias) / temperature)``,
    without storing the ``[..., V]`` logits.

    Args:
        hidden: ``[..., H]`` float32/float64/bfloat16/float16, the last hidden states; differentiable.
            Any strides (a non-contiguous tensor is copied once as ``[N, H]``).
        weight: ``[V, H]``, the LM head (``lm_head.weight``), hidden's dtype and device; differentiable.
        targets: ``[...]`` (``hidden.shape[:-1]``) int64/int32 token ids in ``[0, V)``.
        bias: optional ``[V]``, weight's dtype; differentiable.
        temperature: > 0; the distribution is ``softmax(logits / temperature)`` (sampling temperature).
        mask: optional, like ``targets``, bool or 0/1: the tokens to compute. A masked token's log-prob
            and entropy are 0 and it gives no gradient, whatever its hidden state or target holds
            (padding, an ignore index such as -100).
        entropy: False skips the entropy (``None`` is returned for it, no gradient path through it).
        chunk_size: tokens per chunk; None takes ``max(1, 2**27 // (4 * V))``, so that one chunk of
            float32 logits is about 128 MiB (261 tokens at V = 128256).

    Returns:
        ``(logprob, entropy)``, each shaped like ``targets``: float32 for bf16/fp16 inputs, else
        hidden's dtype (``entropy`` None with ``entropy=False``).

    How: per chunk of tokens, one GEMM makes its ``[rows, V]`` logits (``torch.matmul`` on the inputs'
    device: the BLAS torch ships, MKL/oneDNN on the CPU, cuBLAS on CUDA; in bf16/fp16 the GEMM runs in
    that dtype, accumulating in float32 inside the BLAS, and the chunk's logits are upcast to float32)
    and fastppo's categorical head (:func:`categorical_logprob_entropy`) reduces them to log-prob and
    entropy. Backward recomputes each chunk's logits (a fourth GEMM over the whole call), runs the head's
    backward and writes ``d hidden = g @ weight`` per chunk and ``d weight += g.T @ hidden``,
    ``d bias += g.sum(0)`` (accumulated in the weight's dtype, as Liger's fused linear losses do).
    Memory beyond inputs, outputs and gradients: about two chunks of float32 logits (the logits and
    their gradient, in backward), O(chunk * V), where the logits path holds ``[N, V]`` logits and
    their gradient. With no gradient wanted (``torch.no_grad``, or no input requiring grad: old and
    reference log-probs) only the forward GEMMs run and nothing is saved.

    Precision: float32/float64 agree with a float64 ``log_softmax`` reference to the dtype's rounding.
    In bf16/fp16 the logits are rounded to the input dtype (as in the logits path) before the head:
    the error in log-prob and entropy is that of a bf16 GEMM (about ``|logit| * 2**-8``), like
    ``log_softmax(hidden @ weight.T)`` in bf16; ``d weight`` adds one bf16 rounding per chunk.
    Works under ``torch.compile(fullgraph=True)`` (a custom op ``fastppo::linear_logprob_entropy``).
    """
    temperature, rows = _check_linear(_FN, hidden, weight, targets, bias, mask, temperature, chunk_size)
    want_entropy = bool(entropy)
    if torch.compiler.is_compiling():
        logprob, ent = _linear_op(hidden, weight, targets, bias, mask, temperature, want_entropy, rows)
    elif any(_needs(hidden, weight, bias)):
        logprob, ent = _LinearLogprobEntropy.apply(hidden, weight, targets, bias, mask, temperature, want_entropy, rows)
    else:  # old / reference log-probs: the forward only
        logprob, ent = _forward(hidden, weight, targets, bias, mask, temperature, want_entropy, rows)
    return logprob, ent if want_entropy else None
