"""Fused clipped PPO loss (``fastppo.ppo_loss``), forward and backward in one kernel pass.

Three layers, as in other fused-kernel libraries:
- ``_forward``: the raw call into ``fastppo._C`` (outputs and workspace allocated by torch);
- ``_PPOLoss`` (an ``autograd.Function``, used in eager mode) and the ``fastppo::ppo_loss``
  custom op with its fake implementation and autograd registration (used under
  ``torch.compile``), both saving only the local derivatives the kernel wrote;
- ``ppo_loss``: the public function, which checks its arguments and documents every shape.

No annotations are postponed here: ``torch.library.custom_op`` reads them to build the schema.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from . import _buffers as B

_FN = "fastppo.ppo_loss"
AGG_MODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2}  # the kernel's KlEstimator (fastppo_math.h)
RATIO_LEVELS = ("token", "sequence")
# Input dtypes: the kernel's own, and those it takes through a float32 copy (see ppo_loss).
_DTYPES = ("float32", "float64", "bfloat16", "float16")
_LOW_PRECISION = ("bfloat16", "float16")


class _PPOLossValues(NamedTuple):
    loss: Tensor
    pg_loss: Tensor
    v_loss: Tensor
    entropy: Tensor
    approx_kl: Tensor
    old_approx_kl: Tensor
    clipfrac: Tensor


class PPOLossOutput(_PPOLossValues):
    """What :func:`ppo_loss` returns: the named tuple ``(loss, pg_loss, v_loss, entropy, approx_kl,
    old_approx_kl, clipfrac)``, so ``loss, pg_loss, ... = ppo_loss(...)`` unpacks its 7 values, and
    three more stats as attributes: ``kl`` (the KL term against ``ref_logprob``, aggregated with
    ``agg``; 0 without one), ``clipfrac_low`` and ``clipfrac_high`` (the fractions of selected
    tokens whose ratio is below ``1 - clip_coef`` with a negative advantage, and above
    ``1 + clip_coef_high`` with a positive one: where the clip takes the gradient away).
    ``loss`` is differentiable; the rest are detached 0-dim tensors on the inputs' device (reading
    them with ``.item()`` is the caller's sync, not ours)."""

    # No __slots__: the three stats live in the instance's __dict__, outside the tuple.
    kl: Tensor
    clipfrac_low: Tensor
    clipfrac_high: Tensor


def _rows_cols(shape) -> Tuple[int, int]:
    """The [R, C] problem behind an input shape: a 2-D [B, T] input is B rows of T tokens; any
    other shape is one row of all its elements."""
    if len(shape) == 2:
        return shape[0], shape[1]
    n = 1
    for d in shape:
        n = n * d
    return 1, n


def _forward(
    new_logprob: Tensor, old_logprob: Tensor, advantages: Tensor, new_value: Optional[Tensor],
    old_value: Optional[Tensor], returns: Optional[Tensor], entropy: Optional[Tensor], mask: Optional[Tensor],
    clip_coef: float, vf_coef: float, ent_coef: float, vf_clip_coef: float, dual_clip: float,
    clip_vloss: bool, norm_adv: bool, agg: int, group: Optional[Tensor] = None, group_size: float = 1.0,
    is_weights: Optional[Tensor] = None, ref_logprob: Optional[Tensor] = None, clip_coef_high: Optional[float] = None,
    kl_coef: float = 0.0, kl_estimator: int = -1, sequence_ratio: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Runs the kernel. Returns (loss [], stats [_C.LOSS_STATS], grad_logprob [shape], grad_value
    [shape] or [0], row_scale [R]): the loss, its stats, its gradients w.r.t. new_logprob and
    new_value, and each row's factor d loss / d entropy = -ent_coef * row_scale. kl_estimator: -1
    without ref_logprob, else an index of KL_ESTIMATORS; clip_coef_high None: clip_coef."""
    shape = new_logprob.shape
    R, C = _rows_cols(shape)
    device = new_logprob.device
    loss = new_logprob.new_empty(())
    stats = new_logprob.new_empty(_C.LOSS_STATS)
    grad_logprob = torch.empty(shape, dtype=new_logprob.dtype, device=device)
    grad_value = torch.empty(shape, dtype=new_logprob.dtype, device=device) if new_value is not None else stats.new_empty(0)
    # At least one element: with no rows (a [0, T] batch) the kernel still takes the buffer's address
    # (an empty tensor's data_ptr() is 0).
    row_scale_buffer = stats.new_empty(max(R, 1))
    row_scale = row_scale_buffer[:R]
    workspace = torch.empty(_C.ppo_loss_workspace(R, C), dtype=torch.float64, device=device)
    # The inputs as [R, C] rows (1-D: one row). A reshape may copy: the list keeps it alive for the call.
    views = [x if x is None or x.dim() in (1, 2) else x.reshape(R, C)
             for x in (new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask,
                       is_weights, ref_logprob)]
    _C.ppo_loss(
        R, C, B.DTYPE_NAMES[new_logprob.dtype], *map(B.row_spec, views[:8]),
        "" if mask is None else B.DTYPE_NAMES[mask.dtype],
        clip_coef, vf_coef, ent_coef, vf_clip_coef, dual_clip, clip_vloss, norm_adv, agg,
        grad_logprob.data_ptr(), grad_value.data_ptr() if new_value is not None else None,
        loss.data_ptr(), stats.data_ptr(), row_scale_buffer.data_ptr(), workspace.data_ptr(),
        *B.device_stream(new_logprob),
        None if group is None else group.data_ptr(), group_size,
        clip_coef if clip_coef_high is None else clip_coef_high, B.row_spec(views[8]), B.row_spec(views[9]),
        kl_coef, kl_estimator, sequence_ratio,
    )
    return loss, stats, grad_logprob, grad_value, row_scale


def _backward(
    grad_loss: Tensor, grad_logprob: Tensor, grad_value: Tensor, row_scale: Tensor, mask: Optional[Tensor],
    ent_coef: float, has_value: bool, has_entropy: bool, needs: Tuple[bool, bool, bool], in_place: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. (new_logprob, new_value, entropy): the gradients the kernel saved times the
    incoming gradient of the loss; the entropy's is -ent_coef times its row's scale. `in_place`
    scales the saved buffers themselves, saving an allocation and a pass over fresh memory."""
    scale = Tensor.mul_ if in_place else Tensor.mul
    if in_place and grad_loss.is_cpu and float(grad_loss) == 1.0:
        # loss.backward() on the CPU: the saved gradients are already the answer. Reading a CPU
        # scalar is a memory read, not a device sync.
        scale = lambda saved, _: saved  # noqa: E731
    d_logprob = scale(grad_logprob, grad_loss) if needs[0] else None
    d_value = scale(grad_value, grad_loss) if has_value and needs[1] else None
    d_entropy = None
    if has_entropy and needs[2]:
        shape = grad_logprob.shape
        per_token = row_scale * (grad_loss * -ent_coef)  # [R]
        if len(shape) == 2:
            per_token = per_token.reshape(-1, 1)
        elif len(shape) != 1:
            per_token = per_token.reshape(())  # one row
        # Any nonzero mask value selects its element (as in the kernel): a 2 or a -1 is not a weight.
        # One where() pass: no float copy of the mask to multiply by.
        if mask is None:
            d_entropy = per_token.expand(shape)
        else:
            selected = mask if mask.dtype == torch.bool else mask != 0
            d_entropy = torch.where(selected, per_token, per_token.new_zeros(()))
    return d_logprob, d_value, d_entropy


_INPUTS = 24  # of _forward, the autograd.Function and the custom op


def _grads_for_inputs(d_logprob, d_value, d_entropy):
    return (d_logprob, None, None, d_value, None, None, d_entropy) + (None,) * (_INPUTS - 7)


# ------------------------------------------------------------------ eager: autograd.Function


class _PPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask, *options):
        loss, stats, grad_logprob, grad_value, row_scale = _forward(
            new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask, *options
        )
        ctx.save_for_backward(grad_logprob, grad_value, row_scale, mask)
        ctx.ent_coef = options[2]
        ctx.has_value, ctx.has_entropy = new_value is not None, entropy is not None
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled gradient is made for the stats
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None:
            return (None,) * _INPUTS
        grad_logprob, grad_value, row_scale, mask = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[6])
        # The saved gradients are this graph's own buffers, used once: they are scaled in place. A
        # second backward through a retained graph then fails autograd's saved-tensor version check
        # (a clear error) instead of reusing scaled values.
        return _grads_for_inputs(*_backward(
            grad_loss, grad_logprob, grad_value, row_scale, mask, ctx.ent_coef, ctx.has_value, ctx.has_entropy, needs,
            in_place=True,
        ))


# ------------------------------------------------------------------ torch.compile: custom op


@torch.library.custom_op("fastppo::ppo_loss", mutates_args=())
def _ppo_loss_op(
    new_logprob: Tensor, old_logprob: Tensor, advantages: Tensor, new_value: Optional[Tensor],
    old_value: Optional[Tensor], returns: Optional[Tensor], entropy: Optional[Tensor], mask: Optional[Tensor],
    clip_coef: float, vf_coef: float, ent_coef: float, vf_clip_coef: float, dual_clip: float,
    clip_vloss: bool, norm_adv: bool, agg: int, group: Optional[Tensor] = None, group_size: float = 1.0,
    is_weights: Optional[Tensor] = None, ref_logprob: Optional[Tensor] = None, clip_coef_high: Optional[float] = None,
    kl_coef: float = 0.0, kl_estimator: int = -1, sequence_ratio: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask,
                    clip_coef, vf_coef, ent_coef, vf_clip_coef, dual_clip, clip_vloss, norm_adv, agg, group, group_size,
                    is_weights, ref_logprob, clip_coef_high, kl_coef, kl_estimator, sequence_ratio)


@_ppo_loss_op.register_fake
def _ppo_loss_fake(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask,
                   clip_coef, vf_coef, ent_coef, vf_clip_coef, dual_clip, clip_vloss, norm_adv, agg, group=None, group_size=1.0,
                   is_weights=None, ref_logprob=None, clip_coef_high=None, kl_coef=0.0, kl_estimator=-1,
                   sequence_ratio=False):
    shape = new_logprob.shape
    R, _ = _rows_cols(shape)
    grad_value = new_logprob.new_empty(shape) if new_value is not None else new_logprob.new_empty(0)
    return (new_logprob.new_empty(()), new_logprob.new_empty(_C.LOSS_STATS), new_logprob.new_empty(shape),
            grad_value, new_logprob.new_empty(R))


def _op_setup_context(ctx, inputs, output):
    mask, ent_coef = inputs[7], inputs[10]
    _, _, grad_logprob, grad_value, row_scale = output
    ctx.save_for_backward(grad_logprob, grad_value, row_scale, mask)
    ctx.ent_coef = ent_coef
    ctx.has_value, ctx.has_entropy = inputs[3] is not None, inputs[6] is not None


def _op_backward(ctx, grad_loss, *unused):
    grad_logprob, grad_value, row_scale, mask = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[6])
    return _grads_for_inputs(*_backward(
        grad_loss, grad_logprob, grad_value, row_scale, mask, ctx.ent_coef, ctx.has_value, ctx.has_entropy, needs,
        in_place=False,  # traced graphs must not mutate saved tensors
    ))


_ppo_loss_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------ public function


def ppo_loss(
    new_logprob: Tensor,
    old_logprob: Tensor,
    advantages: Tensor,
    new_value: Optional[Tensor] = None,
    old_value: Optional[Tensor] = None,
    returns: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    clip_coef: float = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    clip_vloss: bool = True,
    vf_clip_coef: Optional[float] = None,
    norm_adv: bool = True,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    group_moments: Optional[Tensor] = None,
    group_size: int = 1,
    clip_coef_high: Optional[float] = None,
    is_weights: Optional[Tensor] = None,
    ratio_level: str = "token",
    ref_logprob: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
) -> PPOLossOutput:
    """The clipped PPO loss, its stats and its gradients in one fused pass (CPU or CUDA).

    Equal to CleanRL's loss, values and gradients, when called with CleanRL's arguments. With the
    options of LLM training it is the GRPO / DAPO / GSPO / Dr. GRPO loss as TRL's ``GRPOTrainer``
    computes it (``epsilon`` / ``epsilon_high`` = ``clip_coef`` / ``clip_coef_high``,
    ``importance_sampling_level`` = ``ratio_level``, ``beta`` = ``kl_coef`` with ``kl_estimator="k3"``,
    ``loss_type`` "bnpo" / "grpo" / "dr_grpo" = ``agg`` "token-mean" / "seq-mean-token-mean" /
    "seq-mean-token-sum-norm", ``norm_adv=False`` for group advantages).

    Args:
        new_logprob: ``[...]`` float32/float64 (or bfloat16/float16, see below), log pi_new(a|s);
            differentiable. A 2-D ``[B, T]`` input is B sequences of T tokens (RLHF); any other
            shape is a flat batch.
        old_logprob: like ``new_logprob``: log pi_old(a|s) from the rollout.
        advantages: like ``new_logprob``. Normalized per call (``norm_adv``) as
            ``(A - mean) / (std + 1e-8)`` with the unbiased std over the selected elements; with fewer
            than two selected elements the std is taken as 0 (torch's std would be NaN).
        new_value: optional, like ``new_logprob``: the critic's new values (differentiable). Needs
            ``returns``, and ``old_value`` too while ``clip_vloss`` is on.
        old_value: optional, like ``new_logprob``: the rollout's values.
        returns: optional, like ``new_logprob``: the returns the value loss regresses on.
        entropy: optional, like ``new_logprob``: per-element policy entropy (differentiable).
        mask: optional, like ``new_logprob``, bool or 0/1: elements to include (valid tokens, real
            transitions). Every mean, and the normalization statistics, is taken over the selected
            elements only, so the result equals the unmasked loss on those elements.
        clip_coef: c in ``clip(ratio, 1 - c, 1 + c)``, > 0.
        vf_coef: weight of the value loss.
        ent_coef: weight of the entropy bonus.
        clip_vloss: clip the value update to ``vf_clip_coef`` (``clip_coef`` when None).
        norm_adv: normalize the advantages per call.
        dual_clip: c > 1 bounds the surrogate at ``-c * A`` for negative advantages (Ye et al. 2020).
        agg: ``"token-mean"`` (mean over selected elements), or for 2-D inputs
            ``"seq-mean-token-mean"`` / ``"seq-mean-token-sum"`` (per sequence mean / sum over its
            selected tokens, then the mean over sequences with at least one selected token), or
            ``"seq-mean-token-sum-norm"`` (the sum over all selected tokens divided by ``B * T``,
            T the second dimension of the input whatever the mask: Dr. GRPO's constant
            normalizer). Applies to pg_loss, v_loss, entropy and the KL term; approx_kl,
            old_approx_kl and the clip fractions are token means.
        group_moments: data-parallel training (token-mean only): float64 ``[3]`` (count, mean, m2)
            of the selected advantages of the whole group's minibatch, on the inputs' device
            (:func:`fastppo.distributed.Group.advantage_moments` all-gathers and merges them). The
            advantages are normalized with them, and every mean divides by ``count / group_size``
            instead of this call's own count, so the average of the ``group_size`` ranks' losses,
            stats and gradients equals the loss over the union of their minibatches. Still one pass.
        group_size: the number of ranks K (>= 1) whose minibatches ``group_moments`` describes.
        clip_coef_high: the upper clip ``1 + clip_coef_high`` (> 0; None: ``clip_coef``); the lower
            stays ``1 - clip_coef``. DAPO's clip-higher is ``clip_coef=0.2, clip_coef_high=0.28``.
            clipfrac counts a ratio outside ``[1 - clip_coef, 1 + clip_coef_high]``.
        is_weights: optional, like ``new_logprob``: per-token weights multiplying the policy term
            (value and gradient), e.g. truncated importance weights ``min(pi_old / pi_rollout, C)``
            for the mismatch between the rollout engine and the trainer. Not differentiated; not
            applied to the value, entropy or KL terms.
        ratio_level: ``"token"`` (each token's ratio), or ``"sequence"`` for 2-D ``[B, T]`` inputs
            (GSPO, TRL's ``importance_sampling_level="sequence"``): every token of sequence b takes
            the ratio ``exp(sum_t m_bt (new - old)_bt / max(sum_t m_bt, 1))``, the mean log-ratio
            over its selected tokens; the gradient flows through that mean into each selected
            token's ``new_logprob``. The clip and its fractions use that ratio; approx_kl and
            old_approx_kl stay the tokens' own.
        ref_logprob: optional, like ``new_logprob``: log pi_ref(a|s) of a reference policy. The
            loss gains ``kl_coef * agg(k)`` with k the per-token estimate of KL(pi || pi_ref) from
            ``d = new_logprob - ref_logprob``; its gradient goes into ``new_logprob``.
        kl_coef: the weight of that KL term, a finite number >= 0; > 0 needs ``ref_logprob``. At 0
            the KL is reported (``out.kl``) but is not part of the loss or its gradient.
        kl_estimator: ``"k1"`` (``d``), ``"k2"`` (``d^2 / 2``) or ``"k3"`` (``exp(-d) + d - 1``,
            TRL's GRPO ``beta`` term), Schulman's estimators.

    Returns:
        :class:`PPOLossOutput` ``(loss, pg_loss, v_loss, entropy, approx_kl, old_approx_kl, clipfrac)``:
        ``loss = pg_loss - ent_coef * entropy + vf_coef * v_loss + kl_coef * kl`` is a
        differentiable 0-dim tensor; the others are detached 0-dim tensors, and so are the
        attributes ``kl``, ``clipfrac_low`` and ``clipfrac_high``. Nothing synchronizes with the host.

    bfloat16 / float16 inputs (every float input of the one dtype of ``new_logprob``) are copied to
    float32 (tensors of ``[B, T]`` size: a copy costs less than the loss) and the float32 kernel
    runs on the copies: sums in float64 and float32 as for float32 inputs, the loss and the stats
    are float32, and the gradients come back in the input's dtype (rounded once, from float32).

    Where the ratio overflows, the loss and its gradient take the clipped branch (finite; CleanRL's
    eager code gives NaN gradients there); approx_kl is then inf. With no selected element the loss
    and stats are 0. Gradients with respect to ``old_logprob``, ``advantages``, ``old_value``,
    ``returns``, ``is_weights`` and ``ref_logprob`` are not computed (they are data, not parameters).
    """
    B.require_array(_FN, "new_logprob", new_logprob, "torch", _DTYPES)
    B.require_like(_FN, "old_logprob", old_logprob, new_logprob, "new_logprob")
    B.require_like(_FN, "advantages", advantages, new_logprob, "new_logprob")
    for name, x in (("new_value", new_value), ("old_value", old_value), ("returns", returns), ("entropy", entropy),
                    ("is_weights", is_weights), ("ref_logprob", ref_logprob)):
        if x is not None:
            B.require_like(_FN, name, x, new_logprob, "new_logprob")
    if mask is not None:
        B.require_like(_FN, "mask", mask, new_logprob, "new_logprob", B.FLAG_DTYPES)
    if new_value is None and (old_value is not None or returns is not None):
        raise ValueError(f"{_FN}: old_value / returns were given without new_value; pass new_value for the value loss")
    if new_value is not None and returns is None:
        raise ValueError(f"{_FN}: new_value was given without returns; the value loss needs both")
    if new_value is not None and clip_vloss and old_value is None:
        raise ValueError(f"{_FN}: clip_vloss=True needs old_value; pass old_value or clip_vloss=False")
    clip_coef = B.require_real(_FN, "clip_coef", clip_coef, "a finite number > 0", 0.0, open_low=True)
    vf_coef = B.require_real(_FN, "vf_coef", vf_coef, "a finite number")
    ent_coef = B.require_real(_FN, "ent_coef", ent_coef, "a finite number")
    vf_clip = clip_coef if vf_clip_coef is None else B.require_real(
        _FN, "vf_clip_coef", vf_clip_coef, "a finite number > 0", 0.0, open_low=True)
    dual = 0.0 if dual_clip is None else B.require_real(
        _FN, "dual_clip", dual_clip, "a finite number > 1", 1.0, open_low=True)
    clip_high = clip_coef if clip_coef_high is None else B.require_real(
        _FN, "clip_coef_high", clip_coef_high, "a finite number > 0 (or None for clip_coef)", 0.0, open_low=True)
    kl_coef = B.require_real(_FN, "kl_coef", kl_coef, "a finite number >= 0", 0.0)
    if agg not in AGG_MODES:
        raise ValueError(f"{_FN}: agg must be one of {sorted(AGG_MODES)}, got {agg!r}")
    if agg != "token-mean" and new_logprob.dim() != 2:
        raise ValueError(f"{_FN}: agg={agg!r} needs 2-D [B, T] inputs, got shape {tuple(new_logprob.shape)}")
    if not isinstance(ratio_level, str) or ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{_FN}: ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    if ratio_level == "sequence" and new_logprob.dim() != 2:
        raise ValueError(f"{_FN}: ratio_level='sequence' needs 2-D [B, T] inputs, got shape "
                         f"{tuple(new_logprob.shape)}")
    if not isinstance(kl_estimator, str) or kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{_FN}: kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if kl_coef > 0.0 and ref_logprob is None:
        raise ValueError(f"{_FN}: kl_coef={kl_coef!r} needs ref_logprob, the reference policy's log-probs")
    B.check_device(_FN, "new_logprob", new_logprob)
    if group_moments is not None:
        B.require_array(_FN, "group_moments", group_moments, "torch", ("float64",))
        if tuple(group_moments.shape) != (3,) or group_moments.device != new_logprob.device:
            raise ValueError(f"{_FN}: group_moments must be a float64 [3] tensor on {new_logprob.device}, got shape "
                             f"{tuple(group_moments.shape)} on {group_moments.device}")
        if agg != "token-mean":
            raise ValueError(f"{_FN}: group_moments needs agg='token-mean', got {agg!r}")
        group_moments = group_moments.contiguous()
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{_FN}: group_size must be an int >= 1, got {type(group_size).__name__} {group_size!r}")
    if group_size < 1:
        raise ValueError(f"{_FN}: group_size must be an int >= 1, got {group_size!r}")
    tensors = (new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask, is_weights, ref_logprob)
    if B.DTYPE_NAMES[new_logprob.dtype] in _LOW_PRECISION:
        # The float32 copies are made by autograd-visible casts, so the gradients return in the
        # input's dtype through the casts' backward. The mask (a flag, never low precision) stays.
        tensors = tuple(x if x is None or i == 7 else x.float() for i, x in enumerate(tensors))
    new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask, is_weights, ref_logprob = tensors
    args = (new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy, mask,
            clip_coef, vf_coef, ent_coef, vf_clip, dual, bool(clip_vloss), bool(norm_adv), AGG_MODES[agg],
            group_moments, float(group_size), is_weights, ref_logprob, clip_high, kl_coef,
            -1 if ref_logprob is None else KL_ESTIMATORS[kl_estimator], ratio_level == "sequence")
    if torch.compiler.is_compiling():
        loss, stats = _ppo_loss_op(*args)[:2]
    else:
        loss, stats = _PPOLoss.apply(*args)
    stats = stats.detach().unbind()
    out = PPOLossOutput(loss, *stats[:6])
    out.kl, out.clipfrac_low, out.clipfrac_high = stats[6:]
    return out
