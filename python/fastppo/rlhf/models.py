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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    ``forward(input_ids [B, L], attention_mask [B, L], position_ids [B, L])`` returns
    ``(logits [B, L, V], hidden [B, L, n_embd])``. No dropout.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        B, L = input_ids.shape
        if L > self.config.max_positions:
            raise ValueError(f"TinyGPT: sequence length {L} exceeds max_positions={self.config.max_positions}")
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        # Keys must be real tokens; each position may always see itself, so a padding row is finite.
        allowed = causal & (attention_mask.bool()[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=input_ids.device))
        x = self.tok(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x, allowed)
        hidden = self.ln_f(x)
        return self.lm_head(hidden), hidden


def hidden_size(model: nn.Module) -> int:
    """The trunk's width: TinyGPT's n_embd, or a transformers config's hidden_size / n_embd."""
    if isinstance(model, TinyGPT):
        return model.hidden_size
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise TypeError(f"cannot tell the hidden size of {type(model).__name__}")


def lm_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(logits [B, L, V], last hidden state [B, L, d])`` of a causal LM, positions from the mask."""
    position_ids = position_ids_from_mask(attention_mask)
    if isinstance(model, TinyGPT):
        return model(input_ids, attention_mask, position_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states[-1]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Sets every dropout probability to 0 (the ratio of PPO's first update must be exactly 1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
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
    value head on a fresh trunk. ``score_mean`` / ``score_std`` normalize the reward model's output
    (set by :meth:`normalize`); they stay 0 / 1 for a value model.
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
        self.to(next(trunk.parameters()).device)  # the new head joins the trunk's device

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` head output at every position (normalized)."""
        _, hidden = lm_forward(self.trunk, input_ids, attention_mask)
        return (self.head(hidden).squeeze(-1) - self.score_mean) / self.score_std

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
