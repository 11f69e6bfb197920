"""TRL's ``GRPOTrainer`` with fastppo's loss: change one import.

    from trl import GRPOTrainer, GRPOConfig             # before
    from fastppo.trl import GRPOTrainer, GRPOConfig     # after: same arguments, same run

Needs the ``trl`` extra (``pip install fastppo[trl]``, TRL 1.16). This module imports TRL when it is
imported; ``import fastppo`` never does.

:class:`GRPOTrainer` is a subclass of ``trl.GRPOTrainer``: its generation, rewards, group advantages,
reference and old log-probs, logging names, checkpoints and callbacks are TRL's. Two pieces are
fastppo's:

- The LM head. TRL gives the policy (and the reference model) a forward that, called with
  ``fused_lm_head=True``, runs the backbone and returns per-token log-probs and entropy without the
  ``[tokens, vocab]`` logits. This class replaces that forward by one that takes the last hidden state
  of the scored positions (the completion tokens only) and calls :func:`fastppo.linear_logprob_entropy`
  with ``lm_head.weight``: chunks of rows, one GEMM each, fastppo's categorical head, and a backward that
  recomputes each chunk. So the new, old and reference log-probs all come from the same function, and
  the first iteration's ratio is exactly 1.
- The loss. ``_compute_loss`` hands those per-token log-probs (and entropy) to one
  :func:`fastppo.ppo_loss` call with the options below, scaled by one number so that it divides by
  what TRL's ``loss_type`` divides by. TRL's metrics (``kl``, ``entropy``, ``clip_ratio/*``) are
  logged under their names, with TRL's definitions.

How TRL's options map onto ``fastppo.ppo_loss`` (every per-token loss is TRL's clipped surrogate
``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` plus ``beta`` times the k3 KL):

=================================  ==========================================================================
TRL                                fastppo.ppo_loss
=================================  ==========================================================================
``loss_type="bnpo"``               ``agg="token-mean"``; the loss divided by the accumulation steps
``loss_type="dapo"``               ``agg="token-mean"`` times ``tokens / normalizer``: TRL's normalizer is the
                                   generation batch's token count per process and accumulation window
``loss_type="grpo"``               ``agg="seq-mean-token-mean"`` times ``(sequences with a token) / B``: TRL's
                                   mean runs over every sequence, an empty one counting 0
``loss_type="dr_grpo"``            ``agg="seq-mean-token-sum-norm"`` (sum / (B T)) times
                                   ``T / max_completion_length``
``loss_type="luspo"``              ``agg="seq-mean-token-sum-norm"`` times ``T`` (sum / B)
``epsilon``, ``epsilon_high``      ``clip_coef``, ``clip_coef_high``
``importance_sampling_level``      ``ratio_level`` (``"token"`` / ``"sequence"``)
``beta``                           ``kl_coef`` with ``ref_logprob`` and ``kl_estimator="k3"``
                                   (``use_bias_correction_kl=False``)
``delta``                          ``dual_clip=delta`` (equal where ``delta > 1 + epsilon_high``)
``temperature``                    the LM head's ``temperature``
vLLM importance sampling,          ``is_weights``: their product, per token, on the policy term only, as TRL
``off_policy_mask_threshold``,     multiplies its per-token policy loss
``top_entropy_quantile``
``entropy_coef`` (``bnpo``)        ``ent_coef`` (TRL's bonus is a token mean, which only ``bnpo``'s
                                   aggregation matches)
advantages                         TRL's, as they are: ``norm_adv=False``
=================================  ==========================================================================

Refused at construction, with a ``ValueError`` naming the option and its value (never a silent
fallback): ``loss_type`` ``"cispo"``, ``"sapo"`` and ``"vespo"`` (their per-token losses are not the
clipped surrogate); ``beta != 0`` with ``use_bias_correction_kl=True`` (TRL's default: the KL term
times the differentiable ratio, which ppo_loss's KL term is not); ``delta <= 1 + epsilon_high``;
``entropy_coef != 0`` with any other ``loss_type`` than ``"bnpo"`` or with ``top_entropy_quantile <
1``, and ``use_adaptive_entropy``; the MoE load-balancing loss (``router_aux_loss_coef``); models whose
logits are soft-capped or scaled (``final_logit_softcapping``, ``logit_scale`` and its kin); DeepSpeed
ZeRO-3 (the head's backward reads ``lm_head.weight`` outside the module's gather hooks).
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

try:
    import transformers
    import trl
    from accelerate.utils import is_peft_model
    from packaging.version import Version
    from torch.distributed.tensor import DTensor
    from trl import GRPOConfig
    from trl import GRPOTrainer as _TRLGRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("fastppo.trl needs TRL 1.16: pip install 'fastppo[trl]'") from err

from .linear import linear_logprob_entropy
from .loss import ppo_loss

__all__ = ["GRPOConfig", "GRPOTrainer", "ppo_loss_options"]

_CLS = "fastppo.trl.GRPOTrainer"
TRL_SERIES = "1.16"
"""The TRL release series this module is written against (``_compute_loss``, the fused LM head's
``fused_lm_head=True`` forward, the keys of the prepared inputs)."""

if ".".join(trl.__version__.split(".")[:2]) != TRL_SERIES:
    raise ImportError(f"fastppo.trl is written against TRL {TRL_SERIES} (the internals of its GRPOTrainer that it "
                      f"overrides); found TRL {trl.__version__}: pip install 'trl=={TRL_SERIES}.*'")

# TRL's loss_type -> ppo_loss's agg. The scale that turns ppo_loss's normalizer into TRL's is
# GRPOTrainer._loss_scale's.
LOSS_TYPES = {
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum-norm",
}
_REFUSED_LOSS_TYPES = {
    "cispo": "its per-token loss is -clamp(ratio, max=epsilon_high).detach() * A * logp, not the clipped surrogate",
    "sapo": "its per-token loss is a sigmoid gate on the ratio, not the clipped surrogate",
    "vespo": "its per-token loss is a Gamma weight of the sequence ratio times A * logp, not the clipped surrogate",
}
# Config attributes that scale or soft-cap the logits before the softmax; the head computes plain
# (hidden @ weight.T + bias) / temperature.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# The multimodal inputs TRL's _compute_loss passes on to the model's forward.
_FORWARD_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                   "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _refuse(option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{_CLS}: {option}={value!r} cannot be computed by fastppo.ppo_loss: {why}")


def ppo_loss_options(args: GRPOConfig) -> Dict[str, Any]:
    """The ``fastppo.ppo_loss`` options that compute ``args``' GRPO loss (without the per-batch tensors
    and the scale of :meth:`GRPOTrainer._loss_scale`), or a ``ValueError`` naming the first option of
    ``args`` that ppo_loss cannot compute exactly."""
    loss_type = args.loss_type
    if loss_type in _REFUSED_LOSS_TYPES:
        raise _refuse("loss_type", loss_type, _REFUSED_LOSS_TYPES[loss_type] + f"; mapped: {sorted(LOSS_TYPES)}")
    if loss_type not in LOSS_TYPES:
        raise _refuse("loss_type", loss_type, f"not a loss type this module knows; mapped: {sorted(LOSS_TYPES)}")
    level = args.importance_sampling_level
    if level not in ("token", "sequence"):
        raise _refuse("importance_sampling_level", level, "ratio_level is 'token' or 'sequence'")
    epsilon = args.epsilon
    epsilon_high = epsilon if args.epsilon_high is None else args.epsilon_high
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
        if not value > 0:
            raise _refuse(name, value, "clip_coef and clip_coef_high must be > 0")
    beta = args.beta
    if not beta >= 0:
        raise _refuse("beta", beta, "kl_coef must be >= 0")
    if beta != 0 and args.use_bias_correction_kl:
        raise _refuse("use_bias_correction_kl", True,
                      f"with beta={beta!r} TRL multiplies the KL term by the (differentiable) ratio, and ppo_loss's KL "
                      "term is the plain k3 estimate; set use_bias_correction_kl=False for TRL's k3 term beta * "
                      "(exp(ref - logp) - (ref - logp) - 1)")
    delta = args.delta
    if delta is not None and not delta > 1 + epsilon_high:
        raise _refuse("delta", delta, f"the two-sided clip equals ppo_loss's dual_clip only where delta > 1 + "
                                      f"epsilon_high = {1 + epsilon_high!r}")
    if args.use_adaptive_entropy:
        raise _refuse("use_adaptive_entropy", True, "the adaptive entropy controller is not part of ppo_loss")
    ent_coef = args.entropy_coef
    if ent_coef != 0:
        if loss_type != "bnpo":
            raise _refuse("entropy_coef", ent_coef,
                          f"TRL's entropy bonus is a token mean whatever the loss_type, and ppo_loss aggregates its "
                          f"entropy term like its loss; only loss_type='bnpo' aggregates by token mean (got "
                          f"loss_type={loss_type!r})")
        if args.top_entropy_quantile < 1.0:
            raise _refuse("entropy_coef", ent_coef, f"with top_entropy_quantile={args.top_entropy_quantile!r} TRL "
                          "averages the entropy bonus over the high-entropy tokens only, not over the loss mask")
    return dict(clip_coef=float(epsilon), clip_coef_high=float(epsilon_high), ratio_level=level,
                agg=LOSS_TYPES[loss_type], dual_clip=None if delta is None else float(delta), kl_coef=float(beta),
                kl_estimator="k3", ent_coef=float(ent_coef), norm_adv=False)


def _check_model(model) -> None:
    """A ValueError for a model whose LM head is not ``hidden @ weight.T + bias``."""
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        # A soft cap of any size changes the logits; a scale of 1 does not.
        if value is not None and (name == "final_logit_softcapping" or value != 1):
            raise _refuse(f"{type(config).__name__}.{name}", value,
                          "fastppo's LM head computes softmax((hidden @ weight.T + bias) / temperature), with no "
                          "scaling or soft-capping of the logits")


# ------------------------------------------------------------------ the LM head


def _head_inputs(hidden, weight, bias, cast_lm_head_to_fp32: bool):
    """``(hidden, weight, bias, context)`` in one dtype for the head, and a context that turns autocast
    off around it: the head's GEMMs run in the dtype given (float32 with ``cast_lm_head_to_fp32``,
    else autocast's dtype where autocast is on, as ``nn.Linear`` would, else the weight's)."""
    device_type = hidden.device.type
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        return hidden.to(weight.dtype), weight, bias, nullcontext()
    cast = [None if x is None else x.to(dtype) for x in (hidden, weight, bias)]
    return (*cast, torch.autocast(device_type, enabled=False))


def _install_head(model, temperature: float, cast_lm_head_to_fp32: bool, entropy: bool) -> None:
    """Give ``model`` a forward whose ``fused_lm_head=True`` call returns TRL's ``FusedCausalLMOutput``
    with log-probs (and entropy) from :func:`fastppo.linear_logprob_entropy`; every other call goes
    to the forward it had (TRL's, and the model's own below it, so generation is unchanged)."""
    previous = model.forward
    text_config = model.config.get_text_config()
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)  # generate() checks its model kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: the head gathered once per call
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        hidden, weight, bias, context = _head_inputs(hidden, weight, bias, cast_lm_head_to_fp32)
        with context:
            # Only the scored positions go through the head: the prompt and the padding cost no GEMM.
            logprob, ent = linear_logprob_entropy(hidden[mask], weight, labels[mask], bias, temperature,
                                                  entropy=entropy)
        # masked_scatter keeps the output connected to the graph when no position is scored.
        log_probs = logprob.new_zeros(mask.shape).masked_scatter(mask, logprob)
        entropy_out = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy_out, label_mask=mask)

    model.forward = types.MethodType(forward, model)


# ------------------------------------------------------------------ the trainer


class GRPOTrainer(_TRLGRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs come from :func:`fastppo.linear_logprob_entropy` on the
    policy's last hidden state and LM head, and whose loss is one :func:`fastppo.ppo_loss` call.

    Same arguments as ``trl.GRPOTrainer``. Options that ppo_loss cannot compute exactly raise a
    ``ValueError`` naming them here, at construction (the module docstring lists them)."""

    def __init__(self, model, reward_funcs=None, args: Optional[GRPOConfig] = None, *rest, **kwargs):
        if args is not None:
            ppo_loss_options(args)  # refuse before a model is loaded
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._ppo_options = ppo_loss_options(self.args)
        if self.aux_loss_enabled:
            raise _refuse("router_aux_loss_coef", self.router_aux_loss_coef,
                          "the MoE load-balancing loss of the model's router is not computed by fastppo's LM head")
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise _refuse("deepspeed zero_stage", 3, "the head's backward reads lm_head.weight outside the module's "
                          "ZeRO-3 gather hooks; use ZeRO-2 or FSDP")
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _check_model(policy)
        _install_head(policy, self.temperature, self.args.cast_lm_head_to_fp32, entropy=True)
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            _check_model(ref)
            _install_head(ref, self.temperature, self.args.cast_lm_head_to_fp32, entropy=False)

    def _loss_scale(self, inputs, mask: torch.Tensor, mode: str):
        """The number that turns ppo_loss's aggregation into the loss TRL's ``loss_type`` computes,
        including the division by the accumulation steps (a tensor or a float)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss_type = self.loss_type
        if loss_type == "bnpo":
            return 1.0 / accumulation
        if loss_type == "dapo":
            # TRL: the token sum over the generation batch's token count per process, per accumulation window.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            return mask.sum() / normalizer
        if loss_type == "grpo":
            # TRL's mean over sequences counts an empty one (all masked) as 0; ppo_loss's leaves it out.
            return (mask.sum(-1) > 0).sum() / (mask.shape[0] * accumulation)
        if loss_type == "dr_grpo":
            return mask.shape[1] / (self.max_completion_length * accumulation)
        return mask.shape[1] / accumulation  # luspo: the token sum over B

    def _policy_weights(self, inputs, logprob, entropy, old_logprob, advantages, mask):
        """Per-token weights of the policy term (``is_weights``), or None: the product of TRL's
        off-policy sequence mask, its high-entropy token mask and vLLM's importance-sampling ratios,
        each where TRL applies it."""
        weights = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_logprob)
            weights.append(self.get_off_policy_mask(advantages, logprob, sampling, mask,
                                                    self.off_policy_mask_threshold))
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropy.detach(), mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        if not weights:
            return None
        product = weights[0].to(logprob.dtype)
        for w in weights[1:]:
            product = product * w.to(logprob.dtype)
        return product.expand(logprob.shape).contiguous()

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # The model's forward with fused_lm_head=True: fastppo's head on the completion positions.
        logprob, entropy, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            **{name: inputs.get(name) for name in _FORWARD_INPUTS})
        advantages = inputs["advantages"]
        if advantages.dim() == 1:  # one per sequence ([B, T] from subclasses that give per-token advantages)
            advantages = advantages.unsqueeze(1)
        old_logprob = inputs.get("old_per_token_logps")
        old_logprob = logprob.detach() if old_logprob is None else old_logprob.to(logprob.dtype)
        ref_logprob = inputs["ref_per_token_logps"].to(logprob.dtype) if self.beta != 0.0 else None
        options = self._ppo_options
        ent_coef = options["ent_coef"]
        out = ppo_loss(
            logprob, old_logprob, advantages.to(logprob.dtype).expand(logprob.shape).contiguous(),
            entropy=entropy if ent_coef != 0 else None, mask=mask,
            is_weights=self._policy_weights(inputs, logprob, entropy, old_logprob, advantages, mask),
            ref_logprob=ref_logprob, **options)
        mode = "train" if self.model.training else "eval"
        loss = out.loss * self._loss_scale(inputs, mask, mode)
        if self._entropy_bonus_enabled:  # bnpo: ppo_loss's token-mean entropy term is TRL's bonus
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(out.loss.detach() + ent_coef * out.entropy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_loss_metrics(mode, logprob.detach(), old_logprob, advantages, entropy.detach(), mask, ref_logprob)
        return loss

    def _log_loss_metrics(self, mode, logprob, old_logprob, advantages, entropy, mask, ref_logprob) -> None:
        """TRL's loss metrics, by its definitions: ``kl`` and ``entropy`` (token means over the mask, all
        processes), ``clip_ratio/{low,high,region}_mean`` (means over tokens, or over sequences with the
        sequence-level ratio) and ``clip_ratio/low_min``, ``clip_ratio/high_max`` (over sequences)."""
        mask = mask.to(logprob.dtype)
        log_ratio = logprob - old_logprob
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)

        def global_mean(x):
            if x.shape[1] == 1:  # one value per sequence
                sums = torch.stack([x.sum(), x.new_tensor(float(x.shape[0]))])
            else:
                sums = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(sums, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def sequence_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        if ref_logprob is not None:
            d = ref_logprob - logprob
            metrics["kl"].append(global_mean(torch.exp(d) - d - 1))
        metrics["entropy"].append(global_mean(entropy))
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).to(logprob.dtype)
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).to(logprob.dtype)
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(low + high))  # disjoint: their union
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(sequence_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(sequence_mean(high))).item())
