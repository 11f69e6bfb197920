"""The offline demo task: a tiny GPT answering digit prompts, judged by a hidden "gold" rule.

Vocabulary: PAD, BOS, SEP, EOS and the digits 0-9. A prompt is ``BOS d d d d SEP``; a response is
some digits and EOS. The hidden gold rule stands in for human judgement:

    gold = (response digits that occur in the prompt) - 2 * (runs of three equal digits)
           - 1 if the response never ends (no EOS)

The fine-tuned ("SFT") model writes random valid responses (1 to 8 uniform digits, then EOS), so
three equal digits in a row are rare in what the raters see: the reward model learns "use the
prompt's digits" well and "do not repeat yourself" poorly, which is the gap an unconstrained policy
exploits. Rankings of pairs of SFT responses are drawn with Bradley-Terry noise:
``P(a preferred to b) = sigmoid(gold(a) - gold(b))``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .build import tiny_gpt_config
from .models import GPTConfig, ScalarHeadModel, TinyGPT, bradley_terry_loss, response_logprobs
from .precision import MasterWeights
from .rollout import generate, truncate_after_eos

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4
VOCAB_SIZE = DIGIT0 + 10
SPECIAL_IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}  # of a transformers config
PROMPT_DIGITS = 4
SFT_MAX_DIGITS = 8
RESPONSE_LENGTH = 12  # the policy may write longer responses than it was fine-tuned on


def model_config() -> GPTConfig:
    """TinyGPT's shape here: 2 layers of width 64, 4 heads, 32 positions."""
    return tiny_gpt_config(VOCAB_SIZE)


def prompts(batch_size: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """``(ids [B, 6], mask [B, 6])``: ``BOS d d d d SEP`` (no padding: every prompt has 4 digits)."""
    digits = torch.randint(0, 10, (batch_size, PROMPT_DIGITS), generator=generator) + DIGIT0
    ids = torch.cat([torch.full((batch_size, 1), BOS), digits, torch.full((batch_size, 1), SEP)], 1)
    return ids, torch.ones_like(ids)


def sft_responses(batch_size: int, generator: torch.Generator) -> Tensor:
    """``[B, SFT_MAX_DIGITS + 1]`` random valid responses: 1-8 uniform digits, EOS, then PAD."""
    lengths = torch.randint(1, SFT_MAX_DIGITS + 1, (batch_size, 1), generator=generator)
    digits = torch.randint(0, 10, (batch_size, SFT_MAX_DIGITS + 1), generator=generator) + DIGIT0
    pos = torch.arange(SFT_MAX_DIGITS + 1)[None, :]
    return torch.where(pos < lengths, digits, torch.where(pos == lengths, EOS, PAD))


def gold_score(query: Tensor, response: Tensor, response_mask: Tensor, has_eos: Tensor) -> Tensor:
    """The hidden rule (see the module docstring); ``[B]`` float32. A token outside the task's
    vocabulary (a model with a larger one may sample it) is no digit."""
    is_digit = (response >= DIGIT0) & (response < VOCAB_SIZE) & response_mask
    prompt_digits = query[:, 1:1 + PROMPT_DIGITS]
    in_prompt = (response[:, :, None] == prompt_digits[:, None, :]).any(-1) & is_digit
    triple = is_digit[:, 2:] & (response[:, 2:] == response[:, 1:-1]) & (response[:, 1:-1] == response[:, :-2])
    return in_prompt.sum(1).float() - 2.0 * triple.sum(1).float() - (~has_eos).float()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sft(policy: TinyGPT, steps: int, batch_size: int, lr: float, generator: torch.Generator,
        fused: bool = True) -> float:
    """Fine-tunes ``policy`` on random valid sequences (next-token loss, the mean over the response's
    tokens up to EOS); returns the last loss. ``fused``: the log-probs from the hidden state and the
    LM head (:func:`~fastppo.rlhf.models.response_logprobs`); a bf16/fp16 policy is stepped through
    float32 master weights (:class:`~fastppo.rlhf.precision.MasterWeights`)."""
    weights = MasterWeights(policy.parameters(), _device(policy).type)
    opt = torch.optim.AdamW(weights.master, lr=lr)
    device = _device(policy)
    policy.train()
    loss = torch.zeros(())
    for _ in range(steps):
        query, qmask = (x.to(device) for x in prompts(batch_size, generator))
        response = sft_responses(batch_size, generator).to(device)
        seq = torch.cat([query, response], 1)
        real = response != PAD
        mask = torch.cat([qmask, real.long()], 1)
        logprob, _, _ = response_logprobs(policy, seq, mask, query.shape[1], response, real, 1.0, fused, entropy=False)
        loss = -logprob.sum() / real.sum()
        weights.zero_grad()
        weights.backward(loss)
        weights.step(opt)
    policy.eval()
    return float(loss.detach())


class Pairs(NamedTuple):
    """Ranked pairs: sequences ``[N, L]`` (query + response, right-padded) and their masks."""

    chosen: Tensor
    chosen_mask: Tensor
    rejected: Tensor
    rejected_mask: Tensor
    gold_margin: Tensor  # [N] gold(chosen) - gold(rejected): negative where the noisy label disagrees

    def split(self, n: int) -> Tuple["Pairs", "Pairs"]:
        return Pairs(*(x[:n] for x in self)), Pairs(*(x[n:] for x in self))


@torch.no_grad()
def ranked_pairs(policy: TinyGPT, n: int, generator: torch.Generator, temperature: float = 1.0) -> Pairs:
    """``n`` pairs of the policy's responses to one prompt, ranked by the gold rule with
    Bradley-Terry noise."""
    query, qmask = (x.to(_device(policy)) for x in prompts(n, generator))
    sides = []
    for _ in range(2):
        raw = generate(policy, query, qmask, RESPONSE_LENGTH, temperature, EOS, PAD, generator)
        response, rmask, has_eos = truncate_after_eos(raw, EOS, PAD)
        sides.append((torch.cat([query, response], 1), torch.cat([qmask.bool(), rmask], 1).long(),
                      gold_score(query, response, rmask, has_eos)))
    (a, am, ga), (b, bm, gb) = sides
    a_wins = torch.rand(n, generator=generator).to(ga.device) < torch.sigmoid(ga - gb)
    pick = lambda x, y: torch.where(a_wins.view(-1, *([1] * (x.dim() - 1))), x, y)  # noqa: E731
    return Pairs(pick(a, b), pick(am, bm), pick(b, a), pick(bm, am), pick(ga, gb) - pick(gb, ga))


def pair_accuracy(rm: ScalarHeadModel, pairs: Pairs) -> float:
    """Fraction of pairs where the reward model scores the chosen response higher."""
    with torch.no_grad():
        return float((rm.score(pairs.chosen, pairs.chosen_mask) > rm.score(pairs.rejected, pairs.rejected_mask)).float().mean())


def gold_accuracy(pairs: Pairs) -> float:
    """The noise-free ceiling: how often the gold rule itself agrees with the noisy labels (ties 1/2)."""
    m = pairs.gold_margin
    return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


def train_reward_model(rm: ScalarHeadModel, pairs: Pairs, epochs: int, batch_size: int, lr: float,
                       generator: torch.Generator, center_coef: float = 0.01, margin: Optional[Tensor] = None) -> float:
    """Bradley-Terry training on ranked pairs; returns the last loss (a bf16/fp16 model through
    float32 master weights)."""
    weights = MasterWeights(rm.parameters(), _device(rm).type)
    opt = torch.optim.AdamW(weights.master, lr=lr)
    n = pairs.chosen.shape[0]
    rm.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(pairs.chosen.device)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            r_c = rm.score(pairs.chosen[idx], pairs.chosen_mask[idx])
            r_r = rm.score(pairs.rejected[idx], pairs.rejected_mask[idx])
            loss = bradley_terry_loss(r_c, r_r, 0.0 if margin is None else margin[idx], center_coef)
            weights.zero_grad()
            weights.backward(loss)
            weights.step(opt)
    rm.eval()
    return float(loss.detach())


@torch.no_grad()
def reference_scores(policy: TinyGPT, rm: ScalarHeadModel, n: int, generator: torch.Generator,
                     temperature: float) -> Tuple[Tensor, Tensor]:
    """Reward-model and gold scores ``([n], [n])`` of the policy's responses at ``temperature``."""
    query, qmask = (x.to(_device(policy)) for x in prompts(n, generator))
    raw = generate(policy, query, qmask, RESPONSE_LENGTH, temperature, EOS, PAD, generator)
    response, rmask, has_eos = truncate_after_eos(raw, EOS, PAD)
    seq, mask = torch.cat([query, response], 1), torch.cat([qmask.bool(), rmask], 1).long()
    return rm.score(seq, mask), gold_score(query, response, rmask, has_eos)


def new_policy(seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(model_config())
