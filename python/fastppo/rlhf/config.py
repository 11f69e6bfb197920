"""The settings of ``fastppo rlhf``'s policy update: :class:`PPOConfig`, one field per flag.

Four algorithms share them (``algo``):

- ``"ppo"``: token-level PPO with a value model (GAE over the response tokens, then whitening);
- ``"grpo"``, ``"dr_grpo"``, ``"rloo"``: critic-free. Each prompt is answered ``group_size`` times
  and each response's advantage comes from its score and the others of its group
  (:func:`fastppo.rlhf.group_advantages`); no value model is built.

The KL against the reference goes into the rewards (``kl_in="reward"``, PPO's per-token penalty)
or into the loss (``kl_in="loss"``, GRPO's ``beta`` term). ``group_size``, ``kl_in`` and
``kl_estimator`` default to None, which :meth:`PPOConfig.resolved` turns into each algorithm's
own choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .._deprecation import renamed_keywords, warn_renamed
from .kernels import KL_ESTIMATORS

ALGOS = ("ppo", "grpo", "dr_grpo", "rloo")
GROUP_ALGOS = ALGOS[1:]
KL_PLACES = ("reward", "loss")
DEFAULT_GROUP_SIZE = 8  # responses per prompt of the critic-free methods (TRL's num_generations)
GROUP_EPS = 1e-4  # added to a group's std by grpo: the constant of TRL's GRPOTrainer

# How each algorithm aggregates ppo_loss's per-token terms (the policy term and the KL term):
# - ppo: the mean over the (micro-batch's) response tokens;
# - grpo: each response's token mean, then the mean over responses (the GRPO paper's loss, TRL's
#   loss_type="grpo"; TRL's default loss_type "dapo" is a token mean over the batch, ppo's here);
# - dr_grpo: the sum over all response tokens divided by responses x response_length, a constant
#   (Dr. GRPO; TRL's loss_type="dr_grpo" with max_completion_length = response_length);
# - rloo: each response's token sum, then the mean over responses: at ratio 1 its gradient is
#   advantage x the gradient of the response's log-probability, RLOO's REINFORCE estimator
#   (TRL's RLOOTrainer takes one ratio per sequence; the clip here is per token).
# The three sequence-level ones are exact over micro-batches: every response has at least one token.
LOSS_AGG = {"ppo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "rloo": "seq-mean-token-sum"}

# PPOConfig's old field names (TRL's, for the clip ranges) and their names now: the constructor, the
# attributes and fastppo rlhf's flags take the old ones this release, with a DeprecationWarning, and
# a checkpoint's settings saved under them are read as the new ones.
RENAMED = {"cliprange": "clip_coef", "cliprange_value": "vf_clip_coef", "lam": "gae_lambda"}

# The settings of a run saved before algo, group_size and kl_in existed: PPO, one response per
# prompt, the KL penalty in the rewards.
BEFORE_ALGOS = {"algo": "ppo", "group_size": 1, "kl_in": "reward"}

# The value model's settings: meaningless without one, so a critic-free run refuses other values.
CRITIC_FIELDS = ("vf_coef", "vf_clip_coef", "gamma", "gae_lambda", "whiten_rewards")


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
    """``settings`` (a saved run's, by field name) with PPOConfig's old names read as the new ones,
    and the algorithm settings of a run saved before they existed (PPO, KL in the rewards)."""
    return {**BEFORE_ALGOS, **{RENAMED.get(name, name): value for name, value in settings.items()}}


def flag(name: str) -> str:
    """The ``fastppo rlhf`` flag of a PPOConfig field."""
    return "--" + name.replace("_", "-")


@dataclass
class PPOConfig:
    """Settings of token-level PPO and of the critic-free group methods (defaults follow common
    RLHF practice, scaled to small models).

    The names are those of ``fastppo train`` and :func:`fastppo.ppo_loss` (``clip_coef``,
    ``vf_clip_coef``, ``gae_lambda``). TRL's PPOConfig calls the first two ``cliprange`` and
    ``cliprange_value``; they, and ``lam`` (this class's name of ``gae_lambda`` before), are
    accepted as aliases this release, as constructor keywords, attributes and ``fastppo rlhf``
    flags, with a DeprecationWarning naming the new name. Giving an alias together with its new
    name is a TypeError naming both (see :data:`RENAMED`).

    ``algo`` picks the update (see the module docstring and :data:`LOSS_AGG`); ``group_size``,
    ``kl_in`` and ``kl_estimator`` left at None take the algorithm's own values
    (:meth:`resolved`).
    """

    batch_size: int = 64
    """responses per iteration: batch_size / group_size prompts, each answered group_size times"""
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
    """beta of the per-token KL penalty in the rewards, or of the KL term in the loss (see kl_in); its starting value when kl_target is set; 0 turns it off"""
    kl_estimator: Optional[str] = None
    """per-token KL estimator: k1, k2 or k3 (None: k1 with the KL in the rewards, k3 in the loss, as GRPO)"""
    kl_clamp: Optional[float] = None
    """bound on each token's KL estimate in the rewards (None: not clamped)"""
    kl_target: Optional[float] = None
    """adapt beta so that the sequence KL tracks this target (None: beta fixed)"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in sequences"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of a response that never emitted EOS (None or 0: no penalty)"""
    clip_coef: float = 0.2
    """clip range of the policy ratio (TRL's cliprange, a deprecated alias here)"""
    vf_clip_coef: float = 0.2
    """clip range of the value update, ppo only (TRL's cliprange_value, a deprecated alias here)"""
    vf_coef: float = 0.1
    """weight of the value loss, ppo only"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    gamma: float = 1.0
    """discount over response tokens, ppo only"""
    gae_lambda: float = 0.95
    """GAE lambda over response tokens, ppo only (TRL's lam, a deprecated alias here)"""
    whiten_rewards: bool = False
    """whiten the shaped rewards (keeping their mean) before GAE, ppo only"""
    algo: str = "ppo"
    """ppo (value model, GAE), or the critic-free grpo, dr_grpo, rloo (group advantages, no value model)"""
    group_size: Optional[int] = None
    """responses per prompt, consecutive in the batch (None: 1 for ppo, 8 for grpo, dr_grpo, rloo)"""
    kl_in: Optional[str] = None
    """where the KL against the reference goes: reward (a per-token penalty) or loss (a loss term) (None: reward for ppo, loss for the others)"""

    def resolved(self) -> "PPOConfig":
        """A copy with ``group_size``, ``kl_in`` and ``kl_estimator`` given: None becomes the
        algorithm's own value (1 / 8 responses per prompt, KL in the reward / loss, k1 / k3)."""
        group = self.algo in GROUP_ALGOS
        kl_in = self.kl_in if self.kl_in is not None else ("loss" if group else "reward")
        return replace(
            self,
            group_size=self.group_size if self.group_size is not None else (DEFAULT_GROUP_SIZE if group else 1),
            kl_in=kl_in,
            kl_estimator=self.kl_estimator if self.kl_estimator is not None else ("k3" if kl_in == "loss" else "k1"),
        )

    @property
    def critic_free(self) -> bool:
        """Whether ``algo`` is a group method (no value model)."""
        return self.algo in GROUP_ALGOS

    def validate(self) -> None:
        """Raises a ValueError naming the field, its flag and its value for any bad setting."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"PPOConfig.{name} must be {what}, got {getattr(self, name)!r} ({flag(name)})")

        need(self.algo in ALGOS, "algo", f"one of {', '.join(ALGOS)}")
        need(self.kl_in is None or self.kl_in in KL_PLACES, "kl_in", "reward or loss")
        need(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1), "group_size",
             "an integer >= 1")
        need(self.kl_estimator is None or self.kl_estimator in KL_ESTIMATORS, "kl_estimator",
             f"one of {sorted(KL_ESTIMATORS)}")
        cfg = self.resolved()
        need(self.batch_size >= 1, "batch_size", ">= 1")
        if cfg.algo == "rloo":
            need(cfg.group_size >= 2, "group_size", ">= 2 with algo 'rloo' (its baseline is the mean of the other "
                 "responses to the prompt)")
        if cfg.batch_size % cfg.group_size:
            raise ValueError(f"PPOConfig.batch_size must be a multiple of group_size={cfg.group_size} (whole groups "
                             f"of responses to a prompt), got {self.batch_size!r} (--batch-size, --group-size)")
        if cfg.critic_free:
            defaults = PPOConfig()
            for name in CRITIC_FIELDS:
                if getattr(self, name) != getattr(defaults, name):
                    raise ValueError(f"PPOConfig.{name} is a setting of the value model, which algo {self.algo!r} "
                                     f"does not have; got {getattr(self, name)!r} ({flag(name)}): leave it at its "
                                     f"default {getattr(defaults, name)!r}")
        if cfg.kl_in == "loss":
            need(self.kl_clamp is None, "kl_clamp", "None with the KL in the loss (it bounds the KL penalty in the "
                 "rewards)")
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
