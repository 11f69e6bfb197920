"""Token-level PPO for language models (RLHF), with fastppo's kernels in every step.

One iteration:

1. left-padded prompts -> sample responses with temperature T (:func:`generate`);
2. truncate each response after its first EOS; score query + response with the reward model at
   the last real token; subtract ``missing_eos_penalty`` from responses without an EOS;
3. per-token log-probs of the response under the policy and the frozen reference, every time
   from ``logits / T`` (:func:`fastppo.categorical_logprob_entropy`, no full log_softmax), so the
   first update's ratio is exactly 1;
4. KL estimate per token and shaped rewards ``-beta * kl`` + score at the last real token
   (:func:`~fastppo.rlhf.kl_penalty_rewards`), beta fixed or adapted to a KL target;
5. GAE over the response tokens (gamma 1, gae_lambda 0.95; :func:`~fastppo.rlhf.token_gae`), then masked
   whitening of the advantages (:func:`~fastppo.rlhf.masked_whiten`);
6. epochs x minibatches x micro-batches of the fused token-level PPO loss
   (:func:`fastppo.ppo_loss`: clipped surrogate, clipped value loss, masked token means).

Metrics use the names RLHF users know: ``objective/kl``, ``objective/entropy``,
``objective/scores``, ``objective/rlhf_reward``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
``val/clipfrac_avg``, ``val/ratio``, ``val/num_eos_tokens`` and more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .._deprecation import renamed_keywords, warn_renamed
from ..heads import categorical_logprob_entropy
from ..learner import apply_gradients
from ..loss import ppo_loss
from .kernels import KL_ESTIMATORS, kl_penalty_rewards, masked_mean, masked_whiten, token_gae
from .models import ScalarHeadModel, disable_dropout, hidden_size, lm_forward


# PPOConfig's old field names (TRL's, for the clip ranges) and their names now: the constructor, the
# attributes and fastppo rlhf's flags take the old ones this release, with a DeprecationWarning, and
# a checkpoint's settings saved under them are read as the new ones.
RENAMED = {"cliprange": "clip_coef", "cliprange_value": "vf_clip_coef", "lam": "gae_lambda"}


def _alias(old: str) -> property:
    """``PPOConfig.<old>``: reads and writes the field's new name, with a DeprecationWarning."""
    new = RENAMED[old]

    def get(self):
        warn_renamed(f"fastppo.rlhf.PPOConfig.{old}", new)
        return getattr(self, new)

    def set(self, value):
        warn_renamed(f"fastppo.rlhf.PPOConfig.{old}", new)
        setattr(self, new, value)

    return property(get, set, doc=f"the old name of {new} (deprecated)")


def current_settings(settings: dict) -> dict:
    """``settings`` (a saved run's, by field name) with PPOConfig's old names read as the new ones."""
    return {RENAMED.get(name, name): value for name, value in settings.items()}


@dataclass
class PPOConfig:
    """Settings of token-level PPO (defaults follow common RLHF practice, scaled to small models).

    The names are those of ``fastppo train`` and :func:`fastppo.ppo_loss` (``clip_coef``,
    ``vf_clip_coef``, ``gae_lambda``). TRL's PPOConfig calls the first two ``cliprange`` and
    ``cliprange_value``; they, and ``lam`` (this class's name of ``gae_lambda`` before), are
    accepted as aliases this release, as constructor keywords, attributes and ``fastppo rlhf``
    flags, with a DeprecationWarning naming the new name. Giving an alias together with its new
    name is a TypeError naming both (see :data:`RENAMED`).
    """

    batch_size: int = 64
    """prompts (and responses) per iteration"""
    response_length: int = 12
    """most tokens sampled per response"""
    temperature: float = 0.7
    """sampling temperature; every log-prob is computed from logits / temperature"""
    ppo_epochs: int = 4
    """passes over each batch"""
    num_minibatches: int = 2
    """optimizer steps per epoch"""
    micro_batch_size: int = 16
    """sequences per forward/backward (gradients accumulate over a minibatch)"""
    learning_rate: float = 3e-4
    """AdamW learning rate of the policy and value model"""
    max_grad_norm: float = 1.0
    """gradient-norm clip per optimizer step"""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty (its starting value when kl_target is set); 0 turns it off"""
    kl_estimator: str = "k1"
    """per-token KL estimator: k1, k2 or k3"""
    kl_clamp: Optional[float] = None
    """bound on each token's KL estimate (None: not clamped)"""
    kl_target: Optional[float] = None
    """adapt beta so that the sequence KL tracks this target (None: beta fixed)"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in sequences"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of a response that never emitted EOS (None or 0: no penalty)"""
    clip_coef: float = 0.2
    """clip range of the policy ratio (TRL's cliprange, a deprecated alias here)"""
    vf_clip_coef: float = 0.2
    """clip range of the value update (TRL's cliprange_value, a deprecated alias here)"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    gamma: float = 1.0
    """discount over response tokens"""
    gae_lambda: float = 0.95
    """GAE lambda over response tokens (TRL's lam, a deprecated alias here)"""
    whiten_rewards: bool = False
    """whiten the shaped rewards (keeping their mean) before GAE"""

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"PPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.response_length >= 1, "response_length", ">= 1")
        need(self.temperature > 0, "temperature", "> 0")
        need(self.ppo_epochs >= 1, "ppo_epochs", ">= 1")
        need(1 <= self.num_minibatches <= self.batch_size, "num_minibatches", f"in [1, batch_size={self.batch_size}]")
        need(self.batch_size % self.num_minibatches == 0, "num_minibatches", f"a divisor of batch_size={self.batch_size}")
        minibatch = self.batch_size // self.num_minibatches
        need(self.micro_batch_size >= 1 and minibatch % self.micro_batch_size == 0, "micro_batch_size",
             f"a divisor of the minibatch size {minibatch}")
        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"one of {sorted(KL_ESTIMATORS)}")
        need(self.kl_clamp is None or self.kl_clamp > 0, "kl_clamp", "None or > 0")
        need(self.kl_target is None or self.kl_target > 0, "kl_target", "None or > 0")
        need(self.kl_horizon >= 1, "kl_horizon", ">= 1")
        need(self.clip_coef > 0, "clip_coef", "> 0")
        need(self.vf_clip_coef > 0, "vf_clip_coef", "> 0")
        need(0 <= self.gamma <= 1, "gamma", "in [0, 1]")
        need(0 <= self.gae_lambda <= 1, "gae_lambda", "in [0, 1]")

    # TRL's names of the clip ranges and the old name of gae_lambda (not fields: aliases that warn).
    cliprange = _alias("cliprange")
    cliprange_value = _alias("cliprange_value")
    lam = _alias("lam")


# The constructor takes the old names too (a dataclass's __init__ is made by @dataclass, so it is
# wrapped here): each warns and sets its field; an old name with its new one is a TypeError.
PPOConfig.__init__ = renamed_keywords("fastppo.rlhf.PPOConfig", **RENAMED)(PPOConfig.__init__)  # type: ignore[method-assign]


class Rollout(NamedTuple):
    """One iteration's batch; response tensors are ``[B, R]``, right-padded after the first EOS."""

    query: Tensor  # [B, Lq] left-padded prompt ids
    sequence: Tensor  # [B, Lq + R] query + response (pad after the first EOS)
    attention_mask: Tensor  # [B, Lq + R]
    response: Tensor  # [B, R]
    response_mask: Tensor  # [B, R] bool: real response tokens (up to and including the first EOS)
    has_eos: Tensor  # [B] bool
    logprob: Tensor  # [B, R] under the sampling policy, 0 at padding
    ref_logprob: Tensor  # [B, R]
    values: Tensor  # [B, R] value before each response token
    scores: Tensor  # [B] reward-model score (after the missing-EOS penalty)
    kl: Tensor  # [B, R]
    rewards: Tensor  # [B, R] shaped
    advantages: Tensor  # [B, R] whitened
    returns: Tensor  # [B, R]


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
        logits = lm_forward(policy, ids, mask)[0][:, -1].float() / temperature
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


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_sequences: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_sequences / self.horizon


class PPOTrainer:
    """Token-level PPO over a policy, a frozen reference, a reward model and a value model.

    Args:
        policy: causal LM being trained (TinyGPT or a transformers causal LM).
        ref_policy: frozen copy of the initial policy.
        reward_model: :class:`ScalarHeadModel` (normalized), read at the last real token.
        value_model: :class:`ScalarHeadModel` to train as the critic; None puts a zero-initialized
            value head on the policy trunk instead (a shared trunk).
        prompts: ``prompts(batch_size, generator) -> (ids [B, Lq], mask [B, Lq])``, left-padded (moved
            to the policy's device).
        eos_id, pad_id: token ids.
        config: :class:`PPOConfig`.
        extra_scores: optional ``{name: fn(query, response, response_mask, has_eos) -> [B]}`` logged
            as ``objective/<name>`` (the demo's hidden gold score).
        generator: the torch.Generator used for sampling prompts, responses and minibatch order.
        group: data-parallel training (:class:`fastppo.distributed.Group`): ``config.batch_size`` is
            this rank's share of the prompts; the models start equal on every rank (the caller's
            job), each optimizer step averages the gradients over the ranks, the whitening
            statistics are the group's, and the metrics are the group's means.
        fsdp: with a group, shard the policy and the value model with FSDP2 (``fully_shard``), for
            models that do not fit one device; the reward and reference models stay replicated.
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module, reward_model: ScalarHeadModel,
                 value_model: Optional[ScalarHeadModel], prompts: Callable, eos_id: int, pad_id: int,
                 config: PPOConfig, extra_scores: Optional[Dict[str, Callable]] = None,
                 generator: Optional[torch.Generator] = None, group=None, fsdp: bool = False):
        config.validate()
        self.policy, self.ref, self.rm, self.critic = disable_dropout(policy), ref_policy, reward_model, value_model
        self.device = next(policy.parameters()).device  # every model and batch lives here
        self.value_head = None
        if value_model is None:
            self.value_head = nn.Linear(hidden_size(policy), 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(self.device)
        self.prompts, self.eos_id, self.pad_id, self.config = prompts, eos_id, pad_id, config
        self.extra_scores = extra_scores or {}
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.group, self.fsdp = group, fsdp
        if fsdp:
            if group is None:
                raise ValueError("PPOTrainer: fsdp needs a data-parallel group")
            group.shard(self.policy)
            if self.critic is not None:
                group.shard(self.critic, methods=("values",))
        # What the optimizer step averages by hand: everything, or (FSDP) what is not sharded.
        self._replicated = [p for p in self.trainable_parameters()
                            if not (fsdp and type(p).__name__ == "DTensor")]
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=config.learning_rate, eps=1e-5)
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target else None
        self.beta = config.kl_coef

    def trainable_parameters(self):
        params = list(self.policy.parameters())
        params += list(self.critic.parameters()) if self.critic is not None else list(self.value_head.parameters())
        return params

    # --- forward passes -------------------------------------------------------------------------

    def _response_logits_values(self, sequence: Tensor, mask: Tensor, query_len: int):
        """Policy logits predicting each response token ``[B, R, V]`` and values before each ``[B, R]``."""
        logits, hidden = lm_forward(self.policy, sequence, mask)
        logits = logits[:, query_len - 1:-1]
        if self.critic is None:
            values = self.value_head(hidden[:, query_len - 1:-1]).squeeze(-1)
        else:
            values = self.critic.values(sequence, mask)[:, query_len - 1:-1]
        return logits, values

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.config
        query, query_mask = self.prompts(cfg.batch_size, self.generator)
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        Lq = query.shape[1]
        raw = generate(self.policy, query, query_mask, cfg.response_length, cfg.temperature, self.eos_id,
                       self.pad_id, self.generator, bool if self.group is None else self.group.all_true)
        response, response_mask, has_eos = truncate_after_eos(raw, self.eos_id, self.pad_id)
        sequence = torch.cat([query, response], 1)
        mask = torch.cat([query_mask.bool(), response_mask], 1).long()
        logprobs, ref_logprobs, values = [], [], []
        for i in range(0, cfg.batch_size, cfg.micro_batch_size):
            s, m, r = sequence[i:i + cfg.micro_batch_size], mask[i:i + cfg.micro_batch_size], response[i:i + cfg.micro_batch_size]
            logits, v = self._response_logits_values(s, m, Lq)
            logprobs.append(categorical_logprob_entropy(logits, r, cfg.temperature)[0])
            ref_logits = lm_forward(self.ref, s, m)[0][:, Lq - 1:-1]
            ref_logprobs.append(categorical_logprob_entropy(ref_logits, r, cfg.temperature)[0])
            values.append(v)
        logprob, ref_logprob, value = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        scores = self.rm.score(sequence, mask).to(logprob.dtype)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
        # Padding is never read by the kernels below; the log-probs are zeroed there for the
        # entropy metric (a sum over each response).
        logprob = torch.where(response_mask, logprob, logprob.new_zeros(()))
        shaped = kl_penalty_rewards(logprob, ref_logprob, response_mask, scores, beta=self.beta,
                                    estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp)
        rewards = self._whiten(shaped.rewards, response_mask, shift_mean=False) if cfg.whiten_rewards else shaped.rewards
        adv, ret = token_gae(rewards, value, shaped.last_index, cfg.gamma, cfg.gae_lambda)
        adv = self._whiten(adv, response_mask)
        return Rollout(query, sequence, mask, response, response_mask, has_eos, logprob, ref_logprob, value, scores,
                       shaped.kl, shaped.rewards, adv, ret)

    def _whiten(self, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
        """masked_whiten with this call's statistics, or the group's."""
        if self.group is None:
            return masked_whiten(x, mask, shift_mean=shift_mean)
        moments = self.group.advantage_moments(x.reshape(1, -1), mask.reshape(1, -1))[0]
        return masked_whiten(x, mask, shift_mean=shift_mean, group_moments=moments)

    # --- one iteration ---------------------------------------------------------------------------

    def step(self) -> Dict[str, float]:
        """One rollout and its PPO update; returns the iteration's metrics."""
        batch = self.rollout()
        return self._metrics(batch, self.update(batch))

    def update(self, batch: Rollout, orders: Optional[list] = None) -> Dict[str, list]:
        """The PPO epochs over ``batch``: shuffled minibatches (``orders``: each epoch's order of the
        batch's rows instead), micro-batches accumulating gradients, one optimizer step per
        minibatch (after the gradients' mean over the group's ranks). Returns the per-micro-batch stats.

        The optimizer step is fastppo.learner's (``apply_gradients``); the loop around it is not
        ``fastppo.learner.Learner``'s because token-level PPO's update differs from it: gradients
        accumulate over micro-batches of sequences (``[B, R]`` tokens), the advantages were whitened
        over the whole batch at rollout time (no per-minibatch normalization), each rank's loss means
        are its own (its gradients are averaged, FSDP's sharded ones by backward itself), the order
        comes from the trainer's generator, and each micro-batch adds the value clip fraction and
        the ratio to the metrics."""
        cfg = self.config
        Lq = batch.query.shape[1]
        minibatch = cfg.batch_size // cfg.num_minibatches
        sums: Dict[str, list] = {k: [] for k in ("approxkl", "clipfrac", "pg", "vf", "vf_clipfrac", "entropy", "ratio")}
        self.policy.train()
        for epoch in range(cfg.ppo_epochs):
            order = orders[epoch] if orders is not None else torch.randperm(cfg.batch_size, generator=self.generator)
            order = order.to(batch.sequence.device)
            for start in range(0, cfg.batch_size, minibatch):
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(start, start + minibatch, cfg.micro_batch_size):
                    idx = order[micro:micro + cfg.micro_batch_size]
                    mask = batch.response_mask[idx]
                    logits, values = self._response_logits_values(batch.sequence[idx], batch.attention_mask[idx], Lq)
                    new_logprob, entropy = categorical_logprob_entropy(logits, batch.response[idx], cfg.temperature)
                    out = ppo_loss(
                        new_logprob, batch.logprob[idx], batch.advantages[idx], new_value=values.to(new_logprob.dtype),
                        old_value=batch.values[idx], returns=batch.returns[idx], entropy=entropy, mask=mask,
                        clip_coef=cfg.clip_coef, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef, clip_vloss=True,
                        vf_clip_coef=cfg.vf_clip_coef, norm_adv=False,
                    )
                    (out.loss * (cfg.micro_batch_size / minibatch)).backward()
                    with torch.no_grad():
                        logratio = torch.where(mask, new_logprob - batch.logprob[idx], new_logprob.new_zeros(()))
                        old_v, ret = batch.values[idx], batch.returns[idx]
                        clipped = old_v + (values - old_v).clamp(-cfg.vf_clip_coef, cfg.vf_clip_coef)
                        sums["vf_clipfrac"].append(masked_mean(((clipped - ret) ** 2 > (values - ret) ** 2).to(ret.dtype), mask))
                        sums["ratio"].append(masked_mean(logratio.exp(), mask))
                    for key, value in (("approxkl", out.approx_kl), ("clipfrac", out.clipfrac), ("pg", out.pg_loss),
                                       ("vf", out.v_loss), ("entropy", out.entropy)):
                        sums[key].append(value)
                apply_gradients(self.optimizer, self.trainable_parameters(), cfg.max_grad_norm, self.group,
                                averaged=self._replicated)
        self.policy.eval()
        return sums

    @torch.no_grad()
    def _metrics(self, batch: Rollout, sums: Dict[str, list]) -> Dict[str, float]:
        mask = batch.response_mask
        kl_per_seq = batch.kl.sum(1)
        non_score = (-self.beta * batch.kl).sum(1)
        ratios = torch.stack(sums["ratio"])
        metrics = {
            "objective/kl": kl_per_seq.mean(),
            "objective/entropy": (-batch.logprob).sum(1).mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (batch.scores + non_score).mean(),
            "objective/scores": batch.scores.mean(),
            "policy/approxkl_avg": torch.stack(sums["approxkl"]).mean(),
            "policy/clipfrac_avg": torch.stack(sums["clipfrac"]).mean(),
            "loss/policy_avg": torch.stack(sums["pg"]).mean(),
            "loss/value_avg": torch.stack(sums["vf"]).mean(),
            "val/clipfrac_avg": torch.stack(sums["vf_clipfrac"]).mean(),
            "policy/entropy_avg": torch.stack(sums["entropy"]).mean(),
            "val/ratio": ratios.mean(),
            "val/ratio_var": ratios.var() if ratios.numel() > 1 else ratios.new_zeros(()),
            "val/num_eos_tokens": (batch.response == self.eos_id).sum().to(batch.scores.dtype),
            "val/response_length": mask.sum(1).to(batch.scores.dtype).mean(),
        }
        for name, fn in self.extra_scores.items():
            metrics[f"objective/{name}"] = fn(batch.query, batch.response, mask, batch.has_eos).to(batch.scores.dtype).mean()
        out = {k: float(v) for k, v in metrics.items()}  # one host sync per iteration, for logging
        sequences = self.config.batch_size
        if self.group is not None:  # every rank has as many sequences: the group's means are the means of the ranks'
            out = dict(zip(out, (v / self.group.size for v in self.group.sum(list(out.values())))))
            sequences *= self.group.size
        out["objective/beta"] = self.beta
        if self.kl_ctl is not None:
            self.kl_ctl.update(out["objective/kl"], sequences)
            self.beta = self.kl_ctl.value
        return out

    # --- checkpoints -----------------------------------------------------------------------------

    def _modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"policy": self.policy, "critic": self.critic or self.value_head})

    def state_dict(self) -> dict:
        """The trainer's state; with FSDP the full (unsharded) tensors, gathered on the CPU (a
        collective: every rank must call it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            models, optim = get_state_dict(self._modules(), self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"modules": models, "optimizer": optim, "generator": self.generator.get_state(),
                    "beta": self.beta, "config": asdict(self.config)}
        return {
            "policy": self.policy.state_dict(),
            "critic": (self.critic or self.value_head).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "beta": self.beta,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self._modules(), self.optimizer, model_state_dict=state["modules"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))  # unused params have no Adam state
        else:
            self.policy.load_state_dict(state["policy"])
            (self.critic or self.value_head).load_state_dict(state["critic"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.beta = state["beta"]
        if self.kl_ctl is not None:
            self.kl_ctl.value = self.beta

