"""The four models of RLHF and the one way fastppo calls them.

- policy: a causal language model (a Hugging Face ``transformers`` causal LM, or the built-in
  :class:`TinyGPT`), sampled with a temperature;
- reference: a frozen copy of the initial policy;
- reward model: :class:`ScalarHeadModel`, a language-model trunk with a scalar head read at each
  sequence's last real token; trained on rankings with the Bradley-Terry loss, then normalized to
  mean 0 / std 1 on reference-policy samples;
- value model (critic): a :class:`ScalarHeadModel` read at every position: a separate model
  initialized from the reward model (the default), or a zero-initialized head on the policy trunk.

Sequences are ``[B, L]`` token ids with an ``attention_mask``; prompts are left-padded, so
position ids are taken from the mask (``cumsum(mask) - 1``). Dropout is off in all four models.

The models may be float32, float64, bfloat16 or float16: every log-prob, value and score they give
the trainer is float32 for the 16-bit dtypes (:func:`widen`). The policy's log-probs come from
:func:`response_logprobs`, by default from the last hidden state and the LM head
(:func:`fastppo.linear_logprob_entropy`) without the ``[tokens, V]`` logits.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..heads import categorical_logprob_entropy
from ..linear import linear_logprob_entropy

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Config fields that scale or soft-cap a transformers model's logits: its LM head is then not
# ``hidden @ weight.T + bias``, which the fused log-prob path computes.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def widen(x: Tensor) -> Tensor:
    """``x`` in float32 when it is bfloat16 or float16, else as it is: what the losses and the
    rollout's targets take."""
    return x.float() if x.dtype in LOW_PRECISION else x


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` positions counting real tokens only: left padding does not shift the positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class GPTConfig:
    """Shape of the built-in :class:`TinyGPT`."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    max_positions: int = 64


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT-2-style causal language model in plain torch (pre-LayerNorm, learned positions).

    ``forward(input_ids [B, L], attention_mask [B, L], position_ids [B, L], logits_to_keep=0)``
    returns ``(logits [B, L, V], hidden [B, L, n_embd])`` (with ``logits_to_keep=k > 0`` the logits of
    the last k positions only, ``[B, k, V]``, as transformers' models). No dropout. With
    ``gradient_checkpointing`` set (:func:`enable_gradient_checkpointing`) each block's activations
    are recomputed in backward instead of stored, in training mode, as transformers' models do.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.max_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                logits_to_keep: int = 0) -> Tuple[Tensor, Tensor]:
        B, L = input_ids.shape
        if L > self.config.max_positions:
            raise ValueError(f"TinyGPT: sequence length {L} exceeds max_positions={self.config.max_positions}")
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        # Keys must be real tokens; each position may always see itself, so a padding row is finite.
        allowed = causal & (attention_mask.bool()[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=input_ids.device))
        x = self.tok(input_ids) + self.pos(position_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, allowed, use_reentrant=False) if recompute else block(x, allowed)
        hidden = self.ln_f(x)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), hidden


def hidden_size(model: nn.Module) -> int:
    """The trunk's width: TinyGPT's n_embd, or a transformers config's hidden_size / n_embd."""
    if isinstance(model, TinyGPT):
        return model.hidden_size
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise TypeError(f"cannot tell the hidden size of {type(model).__name__}")


_KEEP_ARGUMENT: dict = {}  # a transformers model class -> its forward's name for logits_to_keep (None: none)


def _keep_argument(model: nn.Module) -> Optional[str]:
    cls = type(model)
    if cls not in _KEEP_ARGUMENT:
        names = inspect.signature(cls.forward).parameters
        _KEEP_ARGUMENT[cls] = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in names), None)
    return _KEEP_ARGUMENT[cls]


def lm_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
               logits_to_keep: int = 0) -> Tuple[Tensor, Tensor]:
    """``(logits [B, L, V], last hidden state [B, L, d])`` of a causal LM, positions from the mask.

    ``logits_to_keep=k > 0``: the logits of the last k positions only (``[B, k, V]``), where the
    model's forward can leave the others out (TinyGPT, transformers >= 4.45); the hidden state is
    always every position's."""
    position_ids = position_ids_from_mask(attention_mask)
    if isinstance(model, TinyGPT):
        return model(input_ids, attention_mask, position_ids, logits_to_keep)
    keep = _keep_argument(model)
    extra = {keep: logits_to_keep} if logits_to_keep and keep else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False, **extra)
    logits = out.logits[:, -logits_to_keep:] if logits_to_keep and not extra else out.logits
    return logits, out.hidden_states[-1]


def lm_head(model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """The LM head of a causal LM: ``(weight [V, d], bias [V] or None)``, the logits being
    ``hidden @ weight.T + bias``. Sharded by FSDP2 (DTensors), it is gathered (differentiably)."""
    head = model.lm_head if isinstance(model, TinyGPT) else model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"{type(model).__name__} has no LM head (get_output_embeddings() gives {head!r})")
    weight, bias = head.weight, head.bias
    if type(weight).__name__ == "DTensor":
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def logit_transform(config) -> Optional[str]:
    """``"<Config>.<field>=<value>"`` when a transformers config's logits are not ``hidden @ weight.T + bias``
    (soft-capped or scaled, which the fused log-prob path would leave out), else None (also for
    TinyGPT's config and None)."""
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        # A soft cap of any size changes the logits; a scale of 1 does not.
        if value is not None and (name == "final_logit_softcapping" or value != 1):
            return f"{type(config).__name__}.{name}={value!r}"
    return None


def response_logprobs(model: nn.Module, sequence: Tensor, attention_mask: Tensor, query_len: int, response: Tensor,
                      response_mask: Tensor, temperature: float, fused: bool = True,
                      entropy: bool = True) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Log-prob and entropy of each response token under ``softmax(logits / temperature)``.

    Args:
        model: a causal LM (TinyGPT or a transformers causal LM), any float dtype.
        sequence: ``[B, Lq + R]`` query and response ids.
        attention_mask: ``[B, Lq + R]``, the mask of ``sequence``.
        query_len: ``Lq``; the token at ``Lq + t`` is predicted from position ``Lq + t - 1``.
        response: ``[B, R]`` int64, ``sequence[:, Lq:]``.
        response_mask: ``[B, R]`` bool, the tokens to compute (the others give 0).
        temperature: > 0.
        fused: True (the default): :func:`fastppo.linear_logprob_entropy` on the last hidden state of
            the selected tokens and the LM head (:func:`lm_head`), never the ``[B, R, V]`` logits; False:
            the model's logits and :func:`fastppo.categorical_logprob_entropy`. Both compute the LM
            head's GEMM in the model's dtype and the softmax in float32 (bf16/fp16 logits are
            widened first), so they agree to rounding.
        entropy: False skips the entropy (None is returned for it).

    Returns:
        ``(logprob [B, R], entropy [B, R] or None, hidden [B, Lq + R, d])``: log-prob and entropy
        float32 for bf16/fp16 models (else the model's dtype), 0 where ``response_mask`` is False,
        differentiable when grad is enabled; the last hidden state (a value head reads it).
    """
    if fused:
        _, hidden = lm_forward(model, sequence, attention_mask, logits_to_keep=1)
        weight, bias = lm_head(model)
        rows = hidden[:, query_len - 1:-1][response_mask]  # only the response's real tokens meet the head
        lp, ent = linear_logprob_entropy(rows.to(weight.dtype), weight, response[response_mask], bias, temperature,
                                         entropy=entropy)
        # masked_scatter keeps the outputs connected to the graph
        logprob = lp.new_zeros(response_mask.shape).masked_scatter(response_mask, lp)
        ent = None if ent is None else ent.new_zeros(response_mask.shape).masked_scatter(response_mask, ent)
        return logprob, ent, hidden
    logits, hidden = lm_forward(model, sequence, attention_mask)
    lp, ent = categorical_logprob_entropy(widen(logits[:, query_len - 1:-1]), response, temperature)
    zero = lp.new_zeros(())
    return (torch.where(response_mask, lp, zero), torch.where(response_mask, ent, zero) if entropy else None,
            hidden)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block's activations in backward instead of storing them (in
    training mode): TinyGPT's blocks through ``torch.utils.checkpoint``, a transformers model's
    through its own ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before
    transformers 5), non-reentrant. Returns ``model``."""
    if isinstance(model, TinyGPT):
        model.gradient_checkpointing = True
    elif hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing (TinyGPT or a transformers model)")
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Sets every dropout probability to 0 (the ratio of PPO's first update must be exactly 1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # transformers' attention layers keep their config's dropout as a float of their own
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
            if isinstance(getattr(cfg, name, None), float):
                setattr(cfg, name, 0.0)
    return model


class ScalarHeadModel(nn.Module):
    """A causal-LM trunk with a scalar head: the reward model (read at the last real token) or a
    value model (read at every position).

    The head is ``Linear(d, 1)`` initialized N(0, 1/sqrt(d + 1)) for a reward model, or zero for a
    value head on a fresh trunk, in the trunk's dtype and on its device. ``score_mean`` /
    ``score_std`` (float32) normalize the reward model's output (set by :meth:`normalize`); they stay
    0 / 1 for a value model. Outputs are float32 for a bf16/fp16 trunk.
    """

    def __init__(self, trunk: nn.Module, zero_head: bool = False):
        super().__init__()
        self.trunk = disable_dropout(trunk)
        d = hidden_size(trunk)
        self.head = nn.Linear(d, 1)
        if zero_head:
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        first = next(trunk.parameters())
        self.head.to(dtype=first.dtype)  # the new head joins the trunk's dtype and device
        self.to(first.device)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` head output at every position (normalized; float32 for a bf16/fp16 trunk)."""
        _, hidden = lm_forward(self.trunk, input_ids, attention_mask, logits_to_keep=1)
        out = widen(self.head(hidden).squeeze(-1))
        return (out - self.score_mean.to(out.dtype)) / self.score_std.to(out.dtype)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B]`` head output at each sequence's last real token (sequences are right-padded)."""
        last = last_real_index(attention_mask)
        return self.values(input_ids, attention_mask).gather(1, last[:, None]).squeeze(1)

    @torch.no_grad()
    def normalize(self, scores: Tensor) -> None:
        """Shifts and scales future outputs so that these raw scores would have mean 0, std 1."""
        raw = scores * self.score_std + self.score_mean
        self.score_mean.copy_(raw.mean())
        self.score_std.copy_(raw.std().clamp(min=1e-6))


def last_real_index(attention_mask: Tensor) -> Tensor:
    """``[B]`` index of each row's last real token (0 for a row of padding)."""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy with no gradients, in eval mode: the reference model."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0,
                       center_coef: float = 0.0) -> Tensor:
    """``-logsigmoid(r_chosen - r_rejected - margin)`` averaged, plus ``center_coef * mean((r_c + r_r)^2)``
    (keeps the scores centred at 0; the loss alone is blind to a shift)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss
