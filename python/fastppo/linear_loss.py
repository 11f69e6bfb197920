"""``fastppo.linear_ppo_loss``: the PPO loss straight from a language model's hidden states and LM
head, with the gradients for ``hidden``, ``weight`` and ``bias`` made chunk by chunk during the forward
pass (three GEMMs in all; backward only scales them), never holding the ``[tokens, V]`` logits.

The chunk machinery (the GEMMs through torch's BLAS, the head on a chunk, the argument checks) is
``linear.py``'s; this module adds the one pass over chunks of whole sequences, its weighting of each
chunk by its share of the batch's normalizers, the exact two-phase fallback, and the eager / custom-op
layers, as ``loss.py`` does for ``ppo_loss``.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _buffers as B
from . import linear as _chunks
from .linear import (_acc_dtype, _apply_logit_grad, _as_rows, _check_linear, _check_targets, _chunk_targets,
                     _grads_in_dtype, _needs, _zero_grads, linear_logprob_entropy)
from .heads import categorical_logprob_entropy
from .loss import PPOLossOutput, ppo_loss

_FN_LOSS = "fastppo.linear_ppo_loss"

# linear_ppo_loss's statistics, in the order of the custom op's stats vector: ppo_loss's six, then
# those that newer versions of ppo_loss report as attributes of their output.
_STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac", "kl", "clipfrac_low",
          "clipfrac_high")
_TOKEN_MEAN_STATS = ("approx_kl", "old_approx_kl", "clipfrac", "clipfrac_low", "clipfrac_high")
_EXTRA_STATS = _STATS[6:]
# ppo_loss's options that one pass over whole-sequence chunks reproduces exactly; any other goes the
# two-phase way. The tensors among them are per token, shaped like targets, and chunked with it.
_SCALAR_OPTIONS = ("clip_coef", "ent_coef", "norm_adv", "dual_clip", "agg", "clip_coef_high", "ratio_level",
                   "kl_coef", "kl_estimator", "vf_coef", "clip_vloss", "vf_clip_coef")
_TOKEN_OPTIONS = ("is_weights", "ref_logprob")
_VALUE_INPUTS = ("new_value", "old_value", "returns")


# ------------------------------------------------------------------ linear_ppo_loss: the one pass


def _normalized_advantages(advantages: Tensor, selected: Optional[Tensor]) -> Tensor:
    """ppo_loss's normalization over the whole batch: ``(A - mean) / (std + 1e-8)`` over the selected
    tokens, unbiased std, taken as 0 with fewer than two; moments in float64. Masked tokens get 0."""
    a = advantages.double()
    zero = a.new_zeros(())
    chosen = torch.ones_like(a, dtype=torch.bool) if selected is None else selected
    n = chosen.sum()
    mean = torch.where(chosen, a, zero).sum() / n.clamp(min=1)
    deviation = torch.where(chosen, a - mean, zero)
    std = torch.where(n >= 2, (deviation.square().sum() / (n - 1).clamp(min=1)).sqrt(), zero)
    return torch.where(chosen, (a - mean) / (std + 1e-8), zero).to(advantages.dtype)


def _loss_pass(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprob: Tensor, advantages: Tensor,
               bias: Optional[Tensor], mask: Optional[Tensor], temperature: float, rows: int, seq_len: int,
               options: Dict[str, object], needs: Tuple[bool, bool, bool]):
    """``(loss, stats [len(_STATS)], d hidden, d weight, d bias)``: the loss and its gradients in one
    pass, three GEMMs in all.

    Chunks are whole sequences of ``seq_len`` tokens (``seq_len`` > 0, 2-D ``[B, T]`` inputs), so that
    per-sequence quantities stay inside a chunk, or with ``seq_len`` = 0 runs of ``rows`` tokens (the
    token-level token-mean loss). The advantages are normalized over the whole batch first, ppo_loss
    runs on each chunk with ``norm_adv=False``, and each chunk's loss, gradients and stats are weighted
    by the chunk's share of the batch's normalizer: selected tokens for token means, sequences with a
    selected token for the seq-mean aggregations, sequences for seq-mean-token-sum-norm (whose
    normalizer is B * T). The chunk's gradient with respect to its logits comes from
    ``torch.autograd.grad`` through ppo_loss and the head; two GEMMs turn it into ``d hidden`` and
    ``d weight``. Stats a ppo_loss output lacks stay 0."""
    h2, t1, selected = _as_rows(hidden, targets, mask)
    _check_targets(_FN_LOSS, t1, weight.shape[0], selected)
    N = t1.numel()
    acc = _acc_dtype(hidden.dtype)
    d_hidden, d_weight, d_bias = _zero_grads(hidden, weight, bias, needs)
    options = dict(options)
    per_token = {k: options.pop(k).reshape(-1).to(acc) for k in _TOKEN_OPTIONS if k in options}
    agg = options.get("agg", "token-mean")
    ent_coef = options.get("ent_coef", 0.0)
    old = old_logprob.reshape(-1).to(acc)
    adv = advantages.reshape(-1).to(acc)
    if options.get("norm_adv", True):
        adv = _normalized_advantages(adv, selected)
    options["norm_adv"] = False
    chosen = torch.ones(N, dtype=torch.bool, device=t1.device) if selected is None else selected
    tokens = chosen.sum().double().clamp(min=1)  # with none selected every share is 0 / 1
    if seq_len:
        step = max(1, rows // seq_len) * seq_len
        with_tokens = chosen.view(-1, seq_len).any(1)
        sequences = with_tokens.sum().double().clamp(min=1)
    else:
        step = rows
    shape = (-1, seq_len) if seq_len else (-1,)
    loss = torch.zeros((), dtype=torch.float64, device=t1.device)
    stats = torch.zeros(len(_STATS), dtype=torch.float64, device=t1.device)
    grad_on = any(needs)
    for start in range(0, N, step):
        stop = min(N, start + step)
        sel = None if selected is None else selected[start:stop]
        token_share = chosen[start:stop].sum() / tokens
        if agg == "seq-mean-token-sum-norm":
            agg_share = torch.tensor((stop - start) / N, dtype=torch.float64, device=t1.device)
        elif agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
            agg_share = with_tokens[start // seq_len:stop // seq_len].sum() / sequences
        else:
            agg_share = token_share
        h, logits = _chunks._chunk_logits(h2[start:stop], weight, bias, sel)
        # The leaf is shaped for ppo_loss already: inside a custom op (torch.compile) autograd records
        # autograd.Functions (the head's, ppo_loss's) but no plain torch op, so none may stand between them.
        logits = logits.view(*shape, logits.shape[-1]).requires_grad_(grad_on)
        with torch.set_grad_enabled(grad_on):
            chunk_targets = _chunk_targets(t1[start:stop], sel).view(shape)
            lp, ent = categorical_logprob_entropy(logits, chunk_targets, temperature)
            out = ppo_loss(lp, old[start:stop].view(shape), adv[start:stop].view(shape),
                           entropy=ent if ent_coef != 0 else ent.detach(),
                           mask=None if sel is None else sel.view(shape), **options,
                           **{k: v[start:stop].view(shape) for k, v in per_token.items()})
        loss += agg_share * out.loss.detach()
        chunk_stats = [getattr(out, name, None) for name in _STATS]
        shares = torch.stack([token_share if name in _TOKEN_MEAN_STATS else agg_share for name in _STATS])
        stats += shares * torch.stack([lp.new_zeros(()) if s is None else s.detach() for s in chunk_stats]).double()
        if grad_on:
            (g,) = torch.autograd.grad(out.loss, logits, agg_share.to(out.loss.dtype), allow_unused=True)
            if g is not None:
                _apply_logit_grad(g.reshape(h.shape[0], -1), h, weight, start, d_hidden, d_weight, d_bias)
            del g
        del h, logits, lp, ent, out  # before the next chunk's GEMM
    d_weight, d_bias = _grads_in_dtype(d_weight, weight, d_bias, bias)
    grads = (None if d_hidden is None else d_hidden.reshape(hidden.shape), d_weight, d_bias)
    return (loss.to(acc), stats.to(acc)) + grads


def _one_pass_layout(targets: Tensor, options: Dict[str, object], rows: int) -> Optional[int]:
    """How the one pass chunks: 0 for runs of tokens (token-level ratio, token-mean), T for whole
    sequences of a 2-D ``[B, T]`` batch that fit a chunk; None where one pass cannot be exact (a
    sequence longer than a chunk under a per-sequence quantity, an option not known here): the
    two-phase path then."""
    if any(k not in _SCALAR_OPTIONS and k not in _TOKEN_OPTIONS for k in options):
        return None
    if options.get("agg", "token-mean") == "token-mean" and options.get("ratio_level", "token") == "token":
        return 0
    if targets.dim() != 2 or targets.shape[1] > rows:
        return None
    return targets.shape[1]


# ------------------------------------------------------------------ linear_ppo_loss: eager


class _LinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logprob, advantages, mask, temperature, rows, seq_len,
                options, needs):
        loss, stats, d_hidden, d_weight, d_bias = _loss_pass(
            hidden, weight, targets, old_logprob, advantages, bias, mask, temperature, rows, seq_len, options, needs)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None:
            return (None,) * 12
        # The gradients made in forward are this graph's own buffers, used once: scaled in place (a
        # second backward through a retained graph fails autograd's saved-tensor version check).
        grads = [None if g is None else g.mul_(grad_loss) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------ linear_ppo_loss: torch.compile

# The custom op's ppo_loss options: the schema is fixed, so every known option is a parameter of its
# own; None means "not given" (not passed to ppo_loss).
_OPTION_TYPES = {"clip_coef": float, "ent_coef": float, "norm_adv": bool, "dual_clip": float, "agg": str,
                 "clip_coef_high": float, "ratio_level": str, "kl_coef": float, "kl_estimator": str,
                 "vf_coef": float, "clip_vloss": bool, "vf_clip_coef": float}


@torch.library.custom_op("fastppo::linear_ppo_loss", mutates_args=())
def _loss_op(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprob: Tensor, advantages: Tensor,
             bias: Optional[Tensor], mask: Optional[Tensor], is_weights: Optional[Tensor],
             ref_logprob: Optional[Tensor], temperature: float, rows: int, seq_len: int,
             clip_coef: Optional[float], ent_coef: Optional[float], norm_adv: Optional[bool],
             dual_clip: Optional[float], agg: Optional[str], clip_coef_high: Optional[float],
             ratio_level: Optional[str], kl_coef: Optional[float], kl_estimator: Optional[str],
             vf_coef: Optional[float], clip_vloss: Optional[bool], vf_clip_coef: Optional[float],
             needs_hidden: bool, needs_weight: bool, needs_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    given = dict(zip(_OPTION_TYPES, (clip_coef, ent_coef, norm_adv, dual_clip, agg, clip_coef_high, ratio_level,
                                     kl_coef, kl_estimator, vf_coef, clip_vloss, vf_clip_coef)))
    given.update(is_weights=is_weights, ref_logprob=ref_logprob)
    options = {k: v for k, v in given.items() if v is not None}
    loss, stats, *grads = _loss_pass(hidden, weight, targets, old_logprob, advantages, bias, mask, temperature,
                                     rows, seq_len, options, (needs_hidden, needs_weight, needs_bias))
    return (loss, stats) + tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_loss_op.register_fake
def _loss_fake(hidden, weight, targets, old_logprob, advantages, bias, mask, is_weights, ref_logprob, temperature,
               rows, seq_len, clip_coef, ent_coef, norm_adv, dual_clip, agg, clip_coef_high, ratio_level, kl_coef,
               kl_estimator, vf_coef, clip_vloss, vf_clip_coef, needs_hidden, needs_weight, needs_bias):
    acc = _acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(len(_STATS), dtype=acc),
            hidden.new_empty(hidden.shape if needs_hidden else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            hidden.new_empty(bias.shape if needs_bias and bias is not None else (0,)))


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.needs = inputs[-3:]


def _loss_op_backward(ctx, grad_loss, grad_stats, *unused):
    d_hidden, d_weight, d_bias = (g * grad_loss if need else None  # traced: no in-place scaling
                                  for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (d_hidden, d_weight, None, None, None, d_bias) + (None,) * 21


_loss_op.register_autograd(_loss_op_backward, setup_context=_loss_setup)


def _compile_options(options: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The options as the custom op's parameters, or None when one does not fit its type there (the
    two-phase path then passes it to ppo_loss, whose checks name it)."""
    args = {}
    for name, kind in _OPTION_TYPES.items():
        value = options.get(name)
        if value is None:
            args[name] = None
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            args[name] = float(value)
        elif isinstance(value, kind):
            args[name] = value
        else:
            return None
    return args


# ------------------------------------------------------------------ linear_ppo_loss


def _output(loss: Tensor, stats: Tensor) -> PPOLossOutput:
    """ppo_loss's output type from the loss and the stats vector (in ``_STATS``' order)."""
    values = dict(zip(_STATS, stats.detach().unbind()))
    out = PPOLossOutput(loss, *(values[name] for name in PPOLossOutput._fields[1:]))
    for name in _EXTRA_STATS:
        setattr(out, name, values[name])
    return out


def linear_ppo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    **ppo_loss_options,
) -> PPOLossOutput:
    """:func:`fastppo.ppo_loss` of the policy's log-probs computed from ``hidden`` and the LM head,
    with the gradients for ``hidden``, ``weight`` and ``bias`` made chunk by chunk during the forward
    pass: the ``[..., V]`` logits are never stored and backward only scales the saved gradients.

    Args:
        hidden: ``[..., H]``, as in :func:`linear_logprob_entropy`.
        weight: ``[V, H]``, the LM head, as in :func:`linear_logprob_entropy`.
        targets: ``[...]``, the sampled tokens, as in :func:`linear_logprob_entropy`. A 2-D
            ``targets`` ``[B, T]`` is B sequences of T tokens, as in ppo_loss.
        bias: ``[V]`` or None, as in :func:`linear_logprob_entropy`.
        temperature: as in :func:`linear_logprob_entropy`.
        mask: like ``targets``, as in :func:`linear_logprob_entropy`.
        chunk_size: rows per chunk, as in :func:`linear_logprob_entropy`.
        old_logprob: like ``targets``, float32/float64: the rollout's log-probs (cast to the log-probs'
            dtype: float32 for bf16/fp16 inputs, else hidden's).
        advantages: like ``old_logprob``.
        **ppo_loss_options: ppo_loss's policy options (``clip_coef``, ``ent_coef``, ``norm_adv``,
            ``dual_clip``, ``agg``, and where ppo_loss has them ``clip_coef_high``, ``is_weights``,
            ``ratio_level``, ``ref_logprob``, ``kl_coef``, ``kl_estimator``), with ppo_loss's meaning;
            the per-token tensors among them are shaped like ``targets``. The value-model inputs
            (``new_value``, ``old_value``, ``returns``) are refused: an LLM critic is a separate model
            whose loss is ppo_loss's on its own outputs.

    Returns:
        :class:`PPOLossOutput`, as ppo_loss returns it for ``ppo_loss(logprob, old_logprob, advantages,
        entropy=entropy, mask=mask, **options)`` with ``(logprob, entropy)`` from
        :func:`linear_logprob_entropy` (the entropy stat is always reported; its gradient flows only
        with ``ent_coef != 0``). ``loss`` is differentiable with respect to hidden, weight and bias.

    How: one pass, three GEMMs per chunk-sized slice of the batch (the logits, then ``d hidden`` and
    ``d weight``). Chunks are runs of tokens for the token-level token-mean loss and whole sequences
    otherwise, so each sequence's aggregation and GSPO's sequence ratio stay inside a chunk. The only
    batch-wide quantities are known before the first GEMM: the advantages are normalized over the
    whole batch first (``norm_adv``: ppo_loss's formula, unbiased std, 0 with fewer than two selected
    tokens), ppo_loss runs per chunk with ``norm_adv=False``, and each chunk's loss, gradients and
    stats are weighted by its share of the batch's normalizer (selected tokens for token means and
    approx_kl / old_approx_kl / clipfrac; sequences with a selected token for the seq-mean
    aggregations; sequences for seq-mean-token-sum-norm); per chunk ``torch.autograd.grad`` of its
    ppo_loss gives the gradient with respect to the chunk's logits through the head. Where one pass
    cannot be exact (a sequence longer than a chunk under a per-sequence aggregation or ratio, an
    option not listed above, ``group_moments``) it runs in two phases, exact too: the log-probs and
    entropy of :func:`linear_logprob_entropy`, ppo_loss on the whole batch, and a backward that
    recomputes the logits (four GEMMs). Memory beyond inputs and gradients: about two chunks of float32
    logits, as for :func:`linear_logprob_entropy`; the gradients are held from forward to backward.
    Works under ``torch.compile(fullgraph=True)`` (a custom op ``fastppo::linear_ppo_loss``).
    """
    for name in _VALUE_INPUTS:
        if ppo_loss_options.get(name) is not None:
            raise ValueError(f"{_FN_LOSS}: {name} is not taken: this is the policy's loss from its LM head, and a "
                             "value model (an LLM critic is a separate model) has its own loss; call "
                             "fastppo.ppo_loss with new_value / old_value / returns on the critic's outputs")
    temperature, rows = _check_linear(_FN_LOSS, hidden, weight, targets, bias, mask, temperature, chunk_size)
    for name, x in (("old_logprob", old_logprob), ("advantages", advantages)):
        B.require_like(_FN_LOSS, name, x, targets, "targets", B.FLOAT_DTYPES)
    options = {k: v for k, v in ppo_loss_options.items() if v is not None and k not in _VALUE_INPUTS}
    for name in _TOKEN_OPTIONS:
        if name in options:
            B.require_like(_FN_LOSS, name, options[name], targets, "targets", B.FLOAT_DTYPES)
    seq_len = _one_pass_layout(targets, options, rows)
    compiling = torch.compiler.is_compiling()
    op_options = _compile_options(options) if compiling and seq_len is not None else None
    if seq_len is None or (compiling and op_options is None):
        return _two_phase(hidden, weight, targets, old_logprob, advantages, bias, temperature, mask, chunk_size,
                          options)
    needs = _needs(hidden, weight, bias)
    if compiling:
        loss, stats = _loss_op(hidden, weight, targets, old_logprob, advantages, bias, mask, options.get("is_weights"),
                               options.get("ref_logprob"), temperature, rows, seq_len, *op_options.values(),
                               *needs)[:2]
    elif any(needs):
        loss, stats = _LinearPPOLoss.apply(hidden, weight, bias, targets, old_logprob, advantages, mask, temperature,
                                           rows, seq_len, options, needs)
    else:
        loss, stats = _loss_pass(hidden, weight, targets, old_logprob, advantages, bias, mask, temperature, rows,
                                 seq_len, options, needs)[:2]
    return _output(loss, stats)


def _two_phase(hidden, weight, targets, old_logprob, advantages, bias, temperature, mask, chunk_size, options):
    """The exact fallback: log-probs and entropy from linear_logprob_entropy, ppo_loss on the whole
    batch; autograd's backward through both recomputes each chunk's logits (four GEMMs)."""
    logprob, entropy = linear_logprob_entropy(hidden, weight, targets, bias, temperature, mask, True, chunk_size)
    as_logprob = {k: options[k].to(logprob.dtype) for k in _TOKEN_OPTIONS if k in options}
    if options.get("ent_coef", 0.0) == 0:
        entropy = entropy.detach()  # reported as a stat; no gradient path to pay for
    return ppo_loss(logprob, old_logprob.to(logprob.dtype), advantages.to(logprob.dtype), entropy=entropy, mask=mask,
                    **dict(options, **as_logprob))
