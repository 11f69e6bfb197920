"""stable-baselines3 on fastppo's kernels: change one import.

    from stable_baselines3 import PPO      # before
    from fastppo.sb3 import PPO            # after: same arguments, same update, fastppo's kernels

Needs the ``sb3`` extra (``pip install fastppo[sb3]``: stable-baselines3 and torch). This module
imports stable-baselines3 when it is imported; ``import fastppo`` never does.

What runs on fastppo's kernels:

- :class:`RolloutBuffer` (and :class:`DictRolloutBuffer` for dict observations) computes GAE with
  :func:`fastppo.gae`, writing straight into the buffer's own float32 ``advantages`` and ``returns``
  arrays. SB3's ``episode_starts[t]`` ("observation t starts an episode") becomes fastppo's
  ``dones[t]`` ("the episode ended at transition t") by a one-row shift:
  ``dones[t] = episode_starts[t + 1]``, and the ``dones`` SB3 passes in for the last step. Truncation
  is left exactly as SB3 handles it: ``collect_rollouts`` has already added ``gamma * V(final obs)``
  to the reward of a truncated step, and GAE then cuts there as at a termination.
- :class:`PPO` (a subclass of ``stable_baselines3.PPO`` that uses :class:`RolloutBuffer` unless
  ``rollout_buffer_class`` says otherwise) replaces ``train()``: the clipped surrogate, the value
  loss, the entropy term, advantage normalization, approx_kl and clip fraction come from one
  :func:`fastppo.ppo_loss` call per minibatch (forward and gradients in one pass). Where the policy
  is a plain ``ActorCriticPolicy`` whose action distribution is a ``CategoricalDistribution`` or a
  ``DiagGaussianDistribution``, log-prob and entropy come from
  :func:`fastppo.categorical_logprob_entropy` / :func:`fastppo.normal_logprob_entropy` on the
  action head's logits / mean and ``policy.log_std``; any other policy or distribution (gSDE,
  squashed Gaussian, multi-discrete, Bernoulli, a custom ``evaluate_actions``) goes through
  ``policy.evaluate_actions``.

How SB3's update maps onto ``fastppo.ppo_loss``:

- SB3's value loss is ``mean((R - v)^2)`` without fastppo's factor 0.5, so the kernel gets
  ``vf_coef = 2 * vf_coef`` and the logged value loss is twice the kernel's (both exact in
  floating point).
- SB3 clips the value *prediction*, ``v' = v_old + clamp(v - v_old, -clip_range_vf, clip_range_vf)``,
  and takes the plain squared error of ``v'`` (no max with the unclipped error, unlike CleanRL's
  variant that ``ppo_loss(clip_vloss=True)`` computes). That clamp is done in torch and ``v'`` is
  handed to the kernel as the new value with ``clip_vloss=False``; autograd carries the kernel's
  gradient through the clamp.
- Advantages are normalized inside the kernel, per minibatch, as SB3 does
  (``(A - mean) / (std + 1e-8)``, unbiased std), and only when ``normalize_advantage`` is set and the
  minibatch holds more than one sample.
- Without an analytic entropy SB3 uses ``-log_prob`` as the entropy estimate; so does this.
- SB3 accepts ``clip_range = 0`` (a linear schedule reaches it at the last update); the kernel needs
  a positive coefficient, so 0 is passed as the smallest normal float32, with which ``1 +- c`` rounds
  to 1 in float32 and float64 and ``|ratio - 1| > c`` holds exactly where ``|ratio - 1| > 0``: the
  same loss, gradient and clip fraction.
- ``target_kl`` stops the epoch loop before the optimizer step of the first minibatch whose approx_kl
  (``mean((ratio - 1) - log ratio)``) exceeds ``1.5 * target_kl``, as SB3 does. That check reads the
  value on the host, as SB3 does; without ``target_kl`` the minibatch stats stay on the device and
  are read once, after the last epoch.
- Logged: the keys SB3's ``PPO.train`` records (``train/entropy_loss``,
  ``train/policy_gradient_loss``, ``train/value_loss``, ``train/approx_kl``,
  ``train/clip_fraction``, ``train/loss``, ``train/explained_variance``, ``train/std`` when the
  policy has a ``log_std``, ``train/n_updates``, ``train/clip_range``, ``train/clip_range_vf``),
  with SB3's meaning: averages over every minibatch computed, approx_kl over the last epoch's,
  the loss of the last minibatch, ``n_updates`` counting epochs.

Equality with SB3:

- The rollouts are SB3's own (collection is not touched), so both see identical data.
- GAE: bitwise equal to SB3's loop wherever the kernel walks each env's horizon step by step (every
  rollout shape SB3 users run: its float32 operations are numpy's, in numpy's order). Horizons of
  thousands of steps with fewer envs than fastppo's CPU threads take the kernel's chunked parallel scan,
  which reassociates the recursion: equal to a few float32 ulps there.
- ``train()``: equal to rounding, not bitwise. The kernels accumulate means and the normalization
  statistics in float64 where torch reduces in float32, the fused heads compute log-softmax and the
  Gaussian log-density with their own (equally accurate) formulas, and a shared ``log_std``'s
  gradient is summed in another order. After one ``train()`` the parameters agree with SB3's to
  about 1e-7 (float32 rounding carried through a few Adam steps; the tests allow 1e-6).
- Differences by design: where ``exp(log_prob - old_log_prob)`` overflows, fastppo's loss and
  gradient stay finite (the clipped branch) where SB3's become NaN.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO as _SB3PPO
from stable_baselines3.common import buffers as _sb3_buffers
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import explained_variance

import fastppo
from fastppo.learner import apply_gradients

__all__ = ["PPO", "RolloutBuffer", "DictRolloutBuffer", "fused_evaluator"]

# Stands in for a clip range of 0 (see the module docstring): 1 +- this rounds to 1.
_ZERO_CLIP = float(np.finfo(np.float32).tiny)

# Columns of the per-minibatch stats, read back once per train() call.
_PG, _VALUE, _ENTROPY, _CLIPFRAC, _KL, _LOSS = range(6)


class _FusedGAE:
    """``compute_returns_and_advantage`` on :func:`fastppo.gae`, for SB3's rollout buffers."""

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        """GAE(lambda) advantages and TD(lambda) returns of the filled buffer, written in place.

        Args:
            last_values: ``[n_envs]`` or ``[n_envs, 1]`` tensor: V of the observation after the
                last step.
            dones: ``[n_envs]``: the last step ended the episode (SB3's ``dones`` from ``env.step``).
        """
        rewards = self.rewards  # [n_steps, n_envs] float32
        # fastppo's dones[t] is SB3's episode_starts[t + 1]: the episode ended at step t.
        ended = np.empty_like(rewards)
        ended[:-1] = self.episode_starts[1:]
        ended[-1] = np.asarray(dones).reshape(-1)
        last = np.ascontiguousarray(last_values.detach().cpu().numpy().reshape(-1), dtype=rewards.dtype)
        # SB3's reset() allocates both as C-contiguous float32 [n_steps, n_envs]: written in place.
        fastppo.gae(rewards, self.values, ended, last, gamma=self.gamma, gae_lambda=self.gae_lambda,
                    out=(self.advantages, self.returns))


class RolloutBuffer(_FusedGAE, _sb3_buffers.RolloutBuffer):
    """SB3's ``RolloutBuffer`` with GAE computed by :func:`fastppo.gae` (see the module docstring)."""


class DictRolloutBuffer(_FusedGAE, _sb3_buffers.DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` (dict observations) with GAE computed by :func:`fastppo.gae`."""


# ------------------------------------------------------------------ policy evaluation

Evaluator = Callable[[object, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


def fused_evaluator(policy) -> Optional[Evaluator]:
    """``evaluate(obs, actions) -> (values, log_prob, entropy)`` computing log-prob and entropy with
    fastppo's fused heads, or None where ``policy`` is not a plain ``ActorCriticPolicy`` with a
    categorical or diagonal-Gaussian action distribution (then use ``policy.evaluate_actions``).

    ``values`` is ``[batch, 1]``, ``log_prob`` and ``entropy`` are ``[batch]``, as from
    ``policy.evaluate_actions``; ``actions`` are int64 ``[batch]`` (discrete) or float ``[batch, D]``.
    """
    if not isinstance(policy, ActorCriticPolicy):
        return None
    cls = type(policy)
    for name in ("evaluate_actions", "_get_action_dist_from_latent"):
        if getattr(cls, name) is not getattr(ActorCriticPolicy, name):
            return None  # the policy computes its distribution its own way
    kind = type(policy.action_dist)  # exact types: SB3's squashed Gaussian subclasses the plain one
    if kind is CategoricalDistribution:
        def head(params, actions):
            return fastppo.categorical_logprob_entropy(params, actions)
    elif kind is DiagGaussianDistribution:
        def head(params, actions):
            return fastppo.normal_logprob_entropy(params, policy.log_std, actions)
    else:
        return None

    def evaluate(obs, actions):
        features = policy.extract_features(obs)
        if policy.share_features_extractor:
            latent_pi, latent_vf = policy.mlp_extractor(features)
        else:
            latent_pi = policy.mlp_extractor.forward_actor(features[0])
            latent_vf = policy.mlp_extractor.forward_critic(features[1])
        log_prob, entropy = head(policy.action_net(latent_pi), actions)
        return policy.value_net(latent_vf), log_prob, entropy

    return evaluate


# ------------------------------------------------------------------ PPO


def _user_choice(rollout_buffer_class) -> bool:
    """Whether a ``rollout_buffer_class`` argument overrides fastppo's choice: None and fastppo's
    own buffers leave it to the class that builds (or loads) the model."""
    return rollout_buffer_class not in (None, RolloutBuffer, DictRolloutBuffer)


class PPO(_SB3PPO):
    """``stable_baselines3.PPO`` whose GAE and update run on fastppo's kernels.

    Takes exactly SB3's arguments. ``rollout_buffer_class`` defaults to :class:`RolloutBuffer`
    (:class:`DictRolloutBuffer` for dict observation spaces); pass SB3's own class to keep its
    numpy GAE. ``train()`` computes SB3's update (see the module docstring for how each term maps
    onto :func:`fastppo.ppo_loss` and what is equal to rounding).

    Checkpoints travel both ways. ``save()`` writes SB3's own zip without a reference to fastppo
    where fastppo chose the buffer (``rollout_buffer_class`` is left out, so
    ``stable_baselines3.PPO.load`` picks SB3's buffer, even where fastppo is not installed), and
    the class the user passed otherwise. ``PPO.load`` gives fastppo's buffer to a zip saved by SB3
    (whose buffer SB3 chose for itself) or by this class, and keeps a class the user chose: one
    passed when the saved model was made, or to ``load(..., rollout_buffer_class=...)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        setup = kwargs.pop("_init_setup_model", True)
        super().__init__(*args, _init_setup_model=False, **kwargs)
        # SB3 keeps the argument as given. SB3's load builds the model with None and then sets what
        # the zip holds: the class and, where the user had chosen it, _rollout_buffer_class_chosen.
        self._rollout_buffer_class_chosen = _user_choice(self.rollout_buffer_class)
        if setup:
            self._setup_model()

    @classmethod
    def load(cls, path, *args, **kwargs):
        """SB3's ``load``; a ``rollout_buffer_class`` given here is kept like one given to ``PPO()``."""
        if "rollout_buffer_class" in kwargs:
            kwargs["_rollout_buffer_class_chosen"] = _user_choice(kwargs["rollout_buffer_class"])
        return super().load(path, *args, **kwargs)

    def _setup_model(self) -> None:
        if not self._rollout_buffer_class_chosen:
            # Also where SB3's load set the class an SB3 model chose for itself.
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = DictRolloutBuffer if dict_obs else RolloutBuffer
        super()._setup_model()

    def _excluded_save_params(self) -> List[str]:
        excluded = super()._excluded_save_params()
        if not self._rollout_buffer_class_chosen:  # fastppo's own choice: the loading class chooses
            excluded += ["rollout_buffer_class", "_rollout_buffer_class_chosen"]
        return excluded

    def train(self) -> None:
        """One PPO update over the collected rollout: ``n_epochs`` passes of shuffled minibatches,
        stopped early by ``target_kl``; logs SB3's ``train/*`` keys.

        The optimizer step is fastppo.learner's (``apply_gradients``: clip, step); the loop around
        it is SB3's, not ``fastppo.learner.Learner``'s, because SB3's update differs from it: the
        minibatches are the buffer's, the value clip is on the prediction, ``target_kl`` is checked
        at 1.5x before each step (not after an epoch), and the stats are SB3's."""
        policy = self.policy
        policy.set_training_mode(True)
        self._update_learning_rate(policy.optimizer)
        progress = self._current_progress_remaining
        clip_range = float(self.clip_range(progress))
        clip_range_vf = None if self.clip_range_vf is None else float(self.clip_range_vf(progress))
        evaluate = fused_evaluator(policy) or policy.evaluate_actions
        discrete = isinstance(self.action_space, spaces.Discrete)

        stats: List[torch.Tensor] = []  # one row per minibatch computed: _PG .. _LOSS
        last_epoch_start = 0
        for epoch in range(self.n_epochs):
            last_epoch_start = len(stats)
            stop = False
            for batch in self.rollout_buffer.get(self.batch_size):
                actions = batch.actions.long().flatten() if discrete else batch.actions
                values, log_prob, entropy = evaluate(batch.observations, actions)
                out = self._loss(batch, values.flatten(), log_prob, entropy, clip_range, clip_range_vf)
                stats.append(torch.stack([out.pg_loss, out.v_loss, out.entropy, out.clipfrac, out.approx_kl,
                                          out.loss.detach()]))
                if self.target_kl is not None and out.approx_kl.item() > 1.5 * self.target_kl:
                    stop = True
                    if self.verbose >= 1:
                        kl = out.approx_kl.item()
                        print(f"Early stopping in epoch {epoch}: approx_kl {kl:.2f} > 1.5 * target_kl")
                    break
                policy.optimizer.zero_grad()
                out.loss.backward()
                apply_gradients(policy.optimizer, policy.parameters(), self.max_grad_norm)
            self._n_updates += 1  # SB3 counts epochs, the one cut short included
            if stop:
                break
        self._record(torch.stack(stats).cpu().double().numpy(), last_epoch_start, clip_range, clip_range_vf)

    def _loss(self, batch, values: torch.Tensor, log_prob: torch.Tensor, entropy: Optional[torch.Tensor],
              clip_range: float, clip_range_vf: Optional[float]) -> fastppo.PPOLossOutput:
        """SB3's minibatch loss as one fastppo.ppo_loss call (see the module docstring)."""
        if clip_range_vf is not None:  # SB3 clips the prediction itself, then takes the plain error
            values = batch.old_values + torch.clamp(values - batch.old_values, -clip_range_vf, clip_range_vf)
        return fastppo.ppo_loss(
            log_prob, batch.old_log_prob, batch.advantages,
            new_value=values, returns=batch.returns,
            entropy=-log_prob if entropy is None else entropy,
            clip_coef=clip_range if clip_range > 0 else _ZERO_CLIP,
            vf_coef=2.0 * self.vf_coef,  # SB3's value loss has no factor 0.5
            ent_coef=self.ent_coef,
            clip_vloss=False,
            norm_adv=self.normalize_advantage and batch.advantages.numel() > 1,
        )

    def _record(self, stats: np.ndarray, last_epoch_start: int, clip_range: float,
                clip_range_vf: Optional[float]) -> None:
        """Logs what SB3's train() logs, from the per-minibatch stats (float64 ``[minibatches, 6]``)."""
        buffer = self.rollout_buffer
        record = self.logger.record
        record("train/entropy_loss", np.mean(-stats[:, _ENTROPY]))
        record("train/policy_gradient_loss", np.mean(stats[:, _PG]))
        record("train/value_loss", np.mean(2.0 * stats[:, _VALUE]))
        record("train/approx_kl", np.mean(stats[last_epoch_start:, _KL]))
        record("train/clip_fraction", np.mean(stats[:, _CLIPFRAC]))
        record("train/loss", float(stats[-1, _LOSS]))
        record("train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
        if hasattr(self.policy, "log_std"):
            record("train/std", torch.exp(self.policy.log_std).mean().item())
        record("train/n_updates", self._n_updates, exclude="tensorboard")
        record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            record("train/clip_range_vf", clip_range_vf)
