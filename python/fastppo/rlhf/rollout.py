"""What one iteration samples and the targets its update learns from.

- :func:`generate` and :func:`truncate_after_eos`: responses to left-padded prompts, cut after the
  first EOS;
- :func:`targets`: from the log-probs, the reference's, the scores and (PPO) the values, each
  algorithm's per-token advantages: GAE over KL-shaped rewards, then whitening (``"ppo"``), or the
  group advantages of the scores (``"grpo"``, ``"dr_grpo"``, ``"rloo"``);
- :class:`Rollout`: the batch the update reads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .config import GROUP_EPS, PPOConfig
from .group import group_advantages
from .kernels import kl_penalty_rewards, masked_whiten, token_gae
from .models import lm_forward


class Rollout(NamedTuple):
    """One iteration's batch; response tensors are ``[B, R]``, right-padded after the first EOS.
    With ``group_size`` g, rows ``k * g`` to ``(k + 1) * g - 1`` answer the same prompt."""

    query: Tensor  # [B, Lq] left-padded prompt ids
    sequence: Tensor  # [B, Lq + R] query + response (pad after the first EOS)
    attention_mask: Tensor  # [B, Lq + R]
    response: Tensor  # [B, R]
    response_mask: Tensor  # [B, R] bool: real response tokens (up to and including the first EOS)
    has_eos: Tensor  # [B] bool
    logprob: Tensor  # [B, R] under the sampling policy, 0 at padding
    ref_logprob: Tensor  # [B, R]
    values: Optional[Tensor]  # [B, R] value before each response token; None without a value model
    scores: Tensor  # [B] reward-model score (after the missing-EOS penalty)
    kl: Tensor  # [B, R]
    rewards: Tensor  # [B, R] shaped: -beta * kl with the KL in the rewards (else 0), plus the score at the last token
    advantages: Tensor  # [B, R] whitened (ppo) or the group's (grpo, dr_grpo, rloo); 0 at padding
    returns: Optional[Tensor]  # [B, R]; None without a value model


@torch.no_grad()
def generate(policy: nn.Module, query: Tensor, query_mask: Tensor, max_new_tokens: int, temperature: float,
             eos_id: int, pad_id: int, generator: Optional[torch.Generator] = None,
             all_done: Callable[[bool], bool] = bool) -> Tensor:
    """Samples ``[B, max_new_tokens]`` tokens from ``softmax(logits / temperature)``, stopping early
    once every row has emitted ``eos_id``; the rest is filled with ``pad_id``.

    Sampling is Gumbel-max (``argmax(logits / T + Gumbel noise)``, an exact sample of the softmax)
    with the noise drawn from ``generator`` on the CPU, so one seeded generator serves any device.
    ``all_done`` turns "every row of this batch is done" into the decision to stop (sharded models
    must stop on every rank together)."""
    ids, mask = query, query_mask
    B = query.shape[0]
    tokens = []
    done = torch.zeros(B, dtype=torch.bool, device=query.device)
    for _ in range(max_new_tokens):
        logits = lm_forward(policy, ids, mask, logits_to_keep=1)[0][:, -1].float() / temperature  # [B, V] only
        u = torch.rand(logits.shape, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
        tok = (logits - torch.log(-torch.log(u)).to(logits.device)).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done = done | (tok == eos_id)
        if all_done(bool(done.all())):
            break
    out = torch.stack(tokens, 1)
    if out.shape[1] < max_new_tokens:
        out = torch.cat([out, out.new_full((B, max_new_tokens - out.shape[1]), pad_id)], 1)
    return out


def truncate_after_eos(response: Tensor, eos_id: int, pad_id: int):
    """``(response, mask, has_eos)``: tokens after the first EOS become padding; the mask keeps the
    tokens up to and including the first EOS (all of them when there is none)."""
    is_eos = response == eos_id
    has_eos = is_eos.any(1)
    R = response.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, R - 1, dtype=torch.long))
    mask = torch.arange(R, device=response.device)[None, :] <= first[:, None]
    return torch.where(mask, response, torch.full_like(response, pad_id)), mask, has_eos


class Targets(NamedTuple):
    """Output of :func:`targets`, all ``[B, R]``."""

    kl: Tensor  # per-token KL estimate against the reference, 0 at padding
    rewards: Tensor  # shaped rewards (see Rollout.rewards)
    advantages: Tensor  # what ppo_loss takes, with norm_adv=False
    returns: Optional[Tensor]  # GAE returns (ppo), None for the critic-free methods


def group_scores(scores: Tensor, kl: Tensor, beta: float, kl_in: str) -> Tensor:
    """``[B]`` the scores the group methods compare: ``scores - beta * kl.sum(1)`` with the KL in the
    rewards (the penalty of the whole response, as TRL's RLOOTrainer folds it in), ``scores``
    with the KL in the loss."""
    return scores - beta * kl.sum(1) if kl_in == "reward" else scores


def targets(config: PPOConfig, beta: float, logprob: Tensor, ref_logprob: Tensor, response_mask: Tensor,
            scores: Tensor, values: Optional[Tensor] = None,
            whiten: Callable[..., Tensor] = masked_whiten) -> Targets:
    """Each algorithm's advantages of one batch (with ``config``'s None settings resolved, see
    :meth:`PPOConfig.resolved`).

    Every algorithm takes the per-token KL estimate (``config.kl_estimator``) of ``logprob``
    against ``ref_logprob``; with ``kl_in="reward"`` the rewards carry ``-beta * kl``.

    - ``"ppo"``: rewards ``-beta * kl`` (0 with the KL in the loss) plus the score at the last real
      token (:func:`~fastppo.rlhf.kl_penalty_rewards`), optionally whitened, GAE with ``values``
      (:func:`~fastppo.rlhf.token_gae`), then the advantages whitened over the batch's response
      tokens with ``whiten`` (the trainer's: this batch's statistics, or a data-parallel group's).
    - ``"grpo"``, ``"dr_grpo"``, ``"rloo"``: ``group_advantages(group_scores(...), group_size,
      estimator=algo, eps=1e-4, mask=response_mask)`` (TRL's eps): one number per response, at each
      of its tokens. They are already normalized within each group (``grpo``) or centred on the
      group's baseline (``dr_grpo``, ``rloo``), so the loss takes them as they are
      (``norm_adv=False``), as TRL does: its GRPOTrainer scales the rewards in the groups only
      (``scale_rewards="group"``, or ``"none"`` for Dr. GRPO) and its RLOOTrainer leaves the
      leave-one-out advantages as they are (``normalize_advantages=False``, its default). A second,
      batch-wide normalization would undo Dr. GRPO's choice not to divide by the group's std.

    Args:
        config: the settings.
        beta: the KL coefficient now (fixed, or the adaptive controller's).
        logprob, ref_logprob: ``[B, R]`` under the sampling policy and the reference.
        response_mask: ``[B, R]`` bool, the response tokens.
        scores: ``[B]`` reward-model scores (after the missing-EOS penalty).
        values: ``[B, R]`` the value model's (``"ppo"`` only).
        whiten: ``whiten(x, mask, shift_mean=...)``, :func:`~fastppo.rlhf.masked_whiten` or a
            group-wide one.
    """
    config = config.resolved()
    in_reward = config.kl_in == "reward"
    shaped = kl_penalty_rewards(logprob, ref_logprob, response_mask, scores, beta=beta if in_reward else 0.0,
                                estimator=config.kl_estimator, kl_clamp=config.kl_clamp)
    if config.critic_free:
        adv = group_advantages(group_scores(scores, shaped.kl, beta, config.kl_in), config.group_size,
                               estimator=config.algo, eps=GROUP_EPS, mask=response_mask)
        return Targets(shaped.kl, shaped.rewards, adv, None)
    if values is None:
        raise ValueError("fastppo.rlhf.targets: algo 'ppo' needs the value model's values")
    rewards = whiten(shaped.rewards, response_mask, shift_mean=False) if config.whiten_rewards else shaped.rewards
    adv, ret = token_gae(rewards, values, shaped.last_index, config.gamma, config.gae_lambda)
    return Targets(shaped.kl, shaped.rewards, whiten(adv, response_mask), ret)
