"""Token-level PPO for language models (RLHF), and the critic-free group methods (GRPO, Dr. GRPO,
RLOO), with fastppo's kernels in every step.

One iteration:

1. left-padded prompts, each repeated ``group_size`` times (1 for PPO) -> sample responses with
   temperature T (:func:`generate`);
2. truncate each response after its first EOS; score query + response with the reward model at
   the last real token; subtract ``missing_eos_penalty`` from responses without an EOS;
3. per-token log-probs of the response under the policy and the frozen reference, every time
   from ``logits / T``, so the first update's ratio is exactly 1: by default from the last hidden
   state and the LM head (:func:`fastppo.linear_logprob_entropy`, the ``[tokens, V]`` logits never
   stored), or from the model's logits (:func:`fastppo.categorical_logprob_entropy`);
4. KL estimate per token; with the KL in the rewards (PPO's default) shaped rewards ``-beta * kl``
   + score at the last real token (:func:`~fastppo.rlhf.kl_penalty_rewards`), beta fixed or adapted
   to a KL target;
5. advantages (:func:`~fastppo.rlhf.rollout.targets`): PPO's GAE over the response tokens (gamma 1,
   gae_lambda 0.95; :func:`~fastppo.rlhf.token_gae`), then masked whitening
   (:func:`~fastppo.rlhf.masked_whiten`); or the group methods' advantage of each response among
   the others to its prompt (:func:`~fastppo.rlhf.group_advantages`), with no value model at all;
6. epochs x minibatches x micro-batches of the fused token-level PPO loss
   (:func:`fastppo.ppo_loss`: clipped surrogate, PPO's clipped value loss, the KL term when the KL
   is in the loss, aggregated as each algorithm does, see :data:`~fastppo.rlhf.config.LOSS_AGG`).

The models may be float32 or bfloat16/float16 (the log-probs, values, scores and the loss are
float32 then, and the optimizer steps float32 master weights, :mod:`fastppo.rlhf.precision`).

Metrics use the names RLHF users know: ``objective/kl``, ``objective/entropy``,
``objective/scores``, ``objective/rlhf_reward``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
``val/clipfrac_avg`` (PPO), ``val/ratio``, ``val/num_eos_tokens`` and more.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..loss import ppo_loss
from .config import LOSS_AGG, RENAMED, PPOConfig, current_settings  # noqa: F401 (also importable from here)
from .kernels import masked_mean, masked_whiten
from .models import ScalarHeadModel, disable_dropout, hidden_size, logit_transform, response_logprobs, widen
from .precision import MasterWeights
from .rollout import Rollout, generate, targets, truncate_after_eos  # noqa: F401 (also importable from here)


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_sequences: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_sequences / self.horizon


class PPOTrainer:
    """Token-level PPO over a policy, a frozen reference, a reward model and a value model; or, with
    ``config.algo`` one of ``"grpo"``, ``"dr_grpo"``, ``"rloo"``, the critic-free group method over
    the first three models only (no value model, value head, value optimizer state or value loss).

    Args:
        policy: causal LM being trained (TinyGPT or a transformers causal LM).
        ref_policy: frozen copy of the initial policy.
        reward_model: :class:`ScalarHeadModel` (normalized), read at the last real token.
        value_model: :class:`ScalarHeadModel` to train as the critic; None puts a zero-initialized
            value head on the policy trunk instead (a shared trunk). Must be None for the
            critic-free methods.
        prompts: ``prompts(n, generator) -> (ids [n, Lq], mask [n, Lq])``, left-padded (moved to the
            policy's device); asked for ``batch_size / group_size`` prompts per iteration.
        eos_id: the end-of-sequence token id.
        pad_id: the padding token id.
        config: :class:`PPOConfig` (its None settings take the algorithm's values, see
            :meth:`PPOConfig.resolved`; ``self.config`` is the resolved copy).
        extra_scores: optional ``{name: fn(query, response, response_mask, has_eos) -> [B]}`` logged
            as ``objective/<name>`` (the demo's hidden gold score).
        generator: the torch.Generator used for sampling prompts, responses and minibatch order.
        group: data-parallel training (:class:`fastppo.distributed.Group`): ``config.batch_size`` is
            this rank's share of the responses (whole groups: a prompt's responses stay on one
            rank); the models start equal on every rank (the caller's job), each optimizer step
            averages the gradients over the ranks, PPO's whitening statistics are the group's, and
            the metrics are the group's means.
        fsdp: with a group, shard the policy and the value model with FSDP2 (``fully_shard``), for
            models that do not fit one device; the reward and reference models stay replicated
            (float32 models only).
        fused_logprob: the policy's and the reference's log-probs from their last hidden state and LM
            head with :func:`fastppo.linear_logprob_entropy` (the default), never the ``[tokens, V]``
            logits; False: from the models' logits with :func:`fastppo.categorical_logprob_entropy`.
            A model whose logits are scaled or soft-capped needs False (a ValueError says so).

    The models may be float32, float64, bfloat16 or float16 (all in one dtype). With 16-bit
    trainable parameters the optimizer holds float32 master weights and Adam moments, and a float16
    loss is scaled (:class:`~fastppo.rlhf.precision.MasterWeights`). Gradient checkpointing is the
    models' own (:func:`~fastppo.rlhf.models.enable_gradient_checkpointing`): the trainer puts the
    policy and the value model in training mode for the update, where it takes effect.
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module, reward_model: ScalarHeadModel,
                 value_model: Optional[ScalarHeadModel], prompts: Callable, eos_id: int, pad_id: int,
                 config: PPOConfig, extra_scores: Optional[Dict[str, Callable]] = None,
                 generator: Optional[torch.Generator] = None, group=None, fsdp: bool = False,
                 fused_logprob: bool = True):
        config.validate()
        config = config.resolved()
        if config.critic_free and value_model is not None:
            raise ValueError(f"PPOTrainer: algo {config.algo!r} is critic-free; pass value_model=None")
        if fused_logprob:
            for name, model in (("policy", policy), ("ref_policy", ref_policy)):
                problem = logit_transform(getattr(model, "config", None))
                if problem:
                    raise ValueError(f"PPOTrainer: {name}'s {problem} changes the logits, which fused_logprob=True "
                                     "computes as hidden @ lm_head.weight.T; pass fused_logprob=False "
                                     "(--no-fused-logprob)")
        self.policy, self.ref, self.rm, self.critic = disable_dropout(policy), ref_policy, reward_model, value_model
        self.fused_logprob = fused_logprob
        first = next(policy.parameters())
        self.device = first.device  # every model and batch lives here
        self.value_head = None
        if value_model is None and not config.critic_free:
            self.value_head = nn.Linear(hidden_size(policy), 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(self.device, first.dtype)
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
        self.weights = MasterWeights(self.trainable_parameters(), self.device.type)
        if fsdp and self.weights.low_precision:
            raise ValueError("PPOTrainer: fsdp shards float32 models only (the float32 master weights of 16-bit "
                             "parameters are not sharded)")
        # The optimizer steps the float32 masters of 16-bit parameters (the parameters themselves otherwise).
        self.optimizer = torch.optim.AdamW(self.weights.master, lr=config.learning_rate, eps=1e-5)
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target else None
        self.beta = config.kl_coef

    @property
    def value_module(self) -> Optional[nn.Module]:
        """What holds the value function's own parameters: the value model, the value head on the
        policy trunk, or None (the critic-free methods)."""
        return self.critic if self.critic is not None else self.value_head

    def trainable_parameters(self):
        params = list(self.policy.parameters())
        return params + (list(self.value_module.parameters()) if self.value_module is not None else [])

    # --- forward passes -------------------------------------------------------------------------

    def _response_logprobs_values(self, sequence: Tensor, mask: Tensor, query_len: int, response: Tensor,
                                  response_mask: Tensor, entropy: bool = True):
        """The policy's log-prob and entropy of each response token ``[B, R]`` (0 at padding; entropy
        None when not asked) and the values before each ``[B, R]`` (None without a value model), all
        float32 for 16-bit models."""
        logprob, ent, hidden = response_logprobs(self.policy, sequence, mask, query_len, response, response_mask,
                                                 self.config.temperature, self.fused_logprob, entropy)
        if self.config.critic_free:
            values = None
        elif self.critic is None:
            values = widen(self.value_head(hidden[:, query_len - 1:-1]).squeeze(-1))
        else:
            values = self.critic.values(sequence, mask)[:, query_len - 1:-1]
        return logprob, ent, values

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.config
        query, query_mask = self.prompts(cfg.batch_size // cfg.group_size, self.generator)
        if cfg.group_size > 1:  # each prompt's responses one after the other (TRL's layout)
            query, query_mask = query.repeat_interleave(cfg.group_size, 0), query_mask.repeat_interleave(cfg.group_size, 0)
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        Lq = query.shape[1]
        raw = generate(self.policy, query, query_mask, cfg.response_length, cfg.temperature, self.eos_id,
                       self.pad_id, self.generator, bool if self.group is None else self.group.all_true)
        response, response_mask, has_eos = truncate_after_eos(raw, self.eos_id, self.pad_id)
        sequence = torch.cat([query, response], 1)
        mask = torch.cat([query_mask.bool(), response_mask], 1).long()
        logprobs, ref_logprobs, values = [], [], []
        for i in range(0, cfg.batch_size, cfg.micro_batch_size):
            part = slice(i, i + cfg.micro_batch_size)
            s, m, r, rm = sequence[part], mask[part], response[part], response_mask[part]
            lp, _, v = self._response_logprobs_values(s, m, Lq, r, rm, entropy=False)
            logprobs.append(lp)
            ref_logprobs.append(response_logprobs(self.ref, s, m, Lq, r, rm, cfg.temperature, self.fused_logprob,
                                                  entropy=False)[0])
            values.append(v)
        # Both are 0 at padding (never read by the kernels below; the entropy metric sums each response).
        logprob, ref_logprob = torch.cat(logprobs), torch.cat(ref_logprobs)
        value = None if cfg.critic_free else torch.cat(values)
        scores = self.rm.score(sequence, mask).to(logprob.dtype)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
        t = targets(cfg, self.beta, logprob, ref_logprob, response_mask, scores, value, self._whiten)
        return Rollout(query, sequence, mask, response, response_mask, has_eos, logprob, ref_logprob, value, scores,
                       t.kl, t.rewards, t.advantages, t.returns)

    def _whiten(self, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
        """masked_whiten with this call's statistics, or the group's."""
        if self.group is None:
            return masked_whiten(x, mask, shift_mean=shift_mean)
        moments = self.group.advantage_moments(x.reshape(1, -1), mask.reshape(1, -1))[0]
        return masked_whiten(x, mask, shift_mean=shift_mean, group_moments=moments)

    # --- one iteration ---------------------------------------------------------------------------

    def step(self) -> Dict[str, float]:
        """One rollout and its update; returns the iteration's metrics."""
        batch = self.rollout()
        return self._metrics(batch, self.update(batch))

    def _loss(self, batch: Rollout, idx: Tensor, new_logprob: Tensor, entropy: Tensor, values: Optional[Tensor]):
        """``fastppo.ppo_loss`` of one micro-batch: the clipped surrogate on the rollout's advantages
        as they are (``norm_adv=False``: PPO's were whitened over the batch, the group methods'
        normalized in their groups), PPO's clipped value loss, the KL term when the KL is in the
        loss, aggregated as the algorithm does (:data:`~fastppo.rlhf.config.LOSS_AGG`)."""
        cfg = self.config
        options = {}
        if values is not None:
            options.update(new_value=values.to(new_logprob.dtype), old_value=batch.values[idx], returns=batch.returns[idx],
                           vf_coef=cfg.vf_coef, clip_vloss=True, vf_clip_coef=cfg.vf_clip_coef)
        if cfg.kl_in == "loss":
            options.update(ref_logprob=batch.ref_logprob[idx], kl_coef=self.beta, kl_estimator=cfg.kl_estimator)
        if LOSS_AGG[cfg.algo] != "token-mean":
            options.update(agg=LOSS_AGG[cfg.algo])
        return ppo_loss(new_logprob, batch.logprob[idx], batch.advantages[idx], entropy=entropy,
                        mask=batch.response_mask[idx], clip_coef=cfg.clip_coef, ent_coef=cfg.ent_coef, norm_adv=False,
                        **options)

    def update(self, batch: Rollout, orders: Optional[list] = None) -> Dict[str, list]:
        """The PPO epochs over ``batch``: shuffled minibatches (``orders``: each epoch's order of the
        batch's rows instead), micro-batches accumulating gradients, one optimizer step per
        minibatch (after the gradients' mean over the group's ranks). Returns the per-micro-batch stats.

        The optimizer step is fastppo.learner's (``apply_gradients``, on the float32 masters of a 16-bit
        model: :meth:`MasterWeights.step <fastppo.rlhf.precision.MasterWeights.step>`); the loop around it is not
        ``fastppo.learner.Learner``'s because token-level PPO's update differs from it: gradients
        accumulate over micro-batches of sequences (``[B, R]`` tokens), the advantages were made
        over the whole batch at rollout time (no per-minibatch normalization), each rank's loss means
        are its own (its gradients are averaged, FSDP's sharded ones by backward itself), the order
        comes from the trainer's generator, and each micro-batch adds the value clip fraction and
        the ratio to the metrics."""
        cfg = self.config
        Lq = batch.query.shape[1]
        minibatch = cfg.batch_size // cfg.num_minibatches
        sums: Dict[str, list] = {k: [] for k in ("approxkl", "clipfrac", "pg", "vf", "vf_clipfrac", "entropy", "ratio",
                                                 "kl")}
        self._train_mode(True)
        for epoch in range(cfg.ppo_epochs):
            order = orders[epoch] if orders is not None else torch.randperm(cfg.batch_size, generator=self.generator)
            order = order.to(batch.sequence.device)
            for start in range(0, cfg.batch_size, minibatch):
                self.weights.zero_grad()
                for micro in range(start, start + minibatch, cfg.micro_batch_size):
                    idx = order[micro:micro + cfg.micro_batch_size]
                    mask = batch.response_mask[idx]
                    new_logprob, entropy, values = self._response_logprobs_values(
                        batch.sequence[idx], batch.attention_mask[idx], Lq, batch.response[idx], mask)
                    out = self._loss(batch, idx, new_logprob, entropy, values)
                    self.weights.backward(out.loss * (cfg.micro_batch_size / minibatch))
                    with torch.no_grad():
                        logratio = torch.where(mask, new_logprob - batch.logprob[idx], new_logprob.new_zeros(()))
                        sums["ratio"].append(masked_mean(logratio.exp(), mask))
                        if values is not None:
                            old_v, ret = batch.values[idx], batch.returns[idx]
                            clipped = old_v + (values - old_v).clamp(-cfg.vf_clip_coef, cfg.vf_clip_coef)
                            sums["vf_clipfrac"].append(masked_mean(((clipped - ret) ** 2 > (values - ret) ** 2).to(ret.dtype), mask))
                    for key, value in (("approxkl", out.approx_kl), ("clipfrac", out.clipfrac), ("pg", out.pg_loss),
                                       ("vf", out.v_loss), ("entropy", out.entropy), ("kl", out.kl)):
                        sums[key].append(value)
                self.weights.step(self.optimizer, cfg.max_grad_norm, self.group, averaged=self._replicated)
        self._train_mode(False)
        return sums

    def _train_mode(self, on: bool) -> None:
        """Training mode for the update (where a transformers model's gradient checkpointing acts;
        dropout is off), eval mode for the rollout: the policy and the value model."""
        for module in (self.policy, self.critic):
            if module is not None:
                module.train(on)

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
        }
        if sums["vf_clipfrac"]:
            metrics["loss/value_avg"] = torch.stack(sums["vf"]).mean()
            metrics["val/clipfrac_avg"] = torch.stack(sums["vf_clipfrac"]).mean()
        if self.config.kl_in == "loss":
            metrics["loss/kl_avg"] = torch.stack(sums["kl"]).mean()
        metrics.update({
            "policy/entropy_avg": torch.stack(sums["entropy"]).mean(),
            "val/ratio": ratios.mean(),
            "val/ratio_var": ratios.var() if ratios.numel() > 1 else ratios.new_zeros(()),
            "val/num_eos_tokens": (batch.response == self.eos_id).sum().to(batch.scores.dtype),
            "val/response_length": mask.sum(1).to(batch.scores.dtype).mean(),
        })
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
        modules = {"policy": self.policy}
        if self.value_module is not None:
            modules["critic"] = self.value_module
        return nn.ModuleDict(modules)

    def state_dict(self) -> dict:
        """The trainer's state (no ``critic`` entry for the critic-free methods); with FSDP the full
        (unsharded) tensors, gathered on the CPU (a collective: every rank must call it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            models, optim = get_state_dict(self._modules(), self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"modules": models, "optimizer": optim, "generator": self.generator.get_state(),
                    "beta": self.beta, "config": asdict(self.config)}
        state = {"policy": self.policy.state_dict()}
        if self.value_module is not None:
            state["critic"] = self.value_module.state_dict()
        state.update(optimizer=self.optimizer.state_dict(), generator=self.generator.get_state(), beta=self.beta,
                     config=asdict(self.config))
        if self.weights.low_precision:  # the float32 masters (and fp16's loss scale): more than the rounded weights
            state["master_weights"] = self.weights.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self._modules(), self.optimizer, model_state_dict=state["modules"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))  # unused params have no Adam state
        else:
            self.policy.load_state_dict(state["policy"])
            if self.value_module is not None:
                self.value_module.load_state_dict(state["critic"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.weights.low_precision:
                self.weights.load_state_dict(state["master_weights"])
        self.generator.set_state(state["generator"])
        self.beta = state["beta"]
        if self.kl_ctl is not None:
            self.kl_ctl.value = self.beta
