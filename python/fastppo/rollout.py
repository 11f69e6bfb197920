"""Collecting rollouts: one interface, three collectors, each the owner of its rollout storage.

- :class:`SyncFusedCollector`: sync environments, the fused actor-critic; each step is one call into
  the fused policy (action, log-prob and value written into the rollout, the env's action beside
  them) and one into the env step boundary, which writes the step's outcome into the storage;
- :class:`SyncTorchCollector`: sync environments, the torch ``Agent`` (the Atari CNN, a GPU, the
  eager baseline);
- :class:`AsyncCollector`: EnvPool's async mode over :class:`AsyncRollout`'s slots;
- :class:`SyncRecurrentCollector`: sync environments, a recurrent agent
  (:class:`fastppo.recurrent.RecurrentAgent`), its state carried from step to step.

Each :meth:`~Collector.collect` fills one rollout and :meth:`~Collector.batch` returns its GAE
advantages and returns with the rest as a :class:`fastppo.learner.Batch`. A collector starts its
environments, takes their first observations (:meth:`~Collector.start`), or brings them back to a
checkpoint (:meth:`~Collector.resume`), and says what a checkpoint keeps of them (:meth:`~Collector.state`).

With action masks (Discrete / MultiDiscrete actions whose environments say which are legal), the
sync collectors keep the legal actions each step was sampled among, bool ``[T, N, A]``
(``A``: ``n`` or ``sum(nvec)``), the mask that came with the step's observation (from the reset,
or the step before), and hand them to the update with the rest of the rollout.

EnvPool resets an environment on the step *after* it ends: that step ignores the action and
returns the reset observation with reward 0. Those steps are stored like the others and masked out
of the loss, and because the observation stored after a truncated step is the final observation,
``fastppo.gae`` bootstraps truncations exactly (``terminated`` apart from ``dones``).
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

import fastppo
from fastppo.agent import action_head
from fastppo.checkpoint import CheckpointError
from fastppo.envs import action_mask_source, episode_bookkeeping, read_action_masks
from fastppo.envstep import EnvStepBoundary
from fastppo.learner import Batch, SequenceBatch

__all__ = ["AsyncCollector", "AsyncRollout", "Collector", "SyncFusedCollector", "SyncRecurrentCollector",
           "SyncTorchCollector", "make_collector", "rollout_advantages"]


def rollout_advantages(rewards, values, dones, terminated, real, next_value, gamma, gae_lambda, gae=fastppo.gae):
    """GAE over an EnvPool rollout ``[T, N]``. A step that is not ``real`` is the dummy reset step
    after an episode ended: it leads from the final observation to a reset one, so it neither
    bootstraps nor carries the next episode's advantage back (it is masked out of the loss too).
    The real step before it bootstraps from ``values`` of the final observation unless it
    terminated, which is what makes truncation exact."""
    return gae(rewards, values, dones | ~real, next_value, terminated=terminated | ~real, gamma=gamma,
               gae_lambda=gae_lambda)


class AsyncRollout:
    """EnvPool's async mode (``num_envs > batch_size``): each ``recv`` hands back ``B`` of the
    ``N`` environments, in any order, and each gets its next action by ``send``. A rollout is
    ``T`` recv/send rounds stored as ``T * B`` slots with their env id; a slot's reward and done
    arrive with that env's next recv. The last slot of each env in a rollout is still in flight
    when learning starts: it is masked out and its value bootstraps the env's previous slot (its
    outcome, arriving in the next rollout, still counts for the episode statistics)."""

    def __init__(self, envs, boundary: EnvStepBoundary, family: str, T: int, B: int, obs_shape, obs_dtype, device):
        self.envs, self.boundary, self.family = envs, boundary, family
        self.T, self.B, self.N, self.device = T, B, boundary.N, device
        self.obs = np.zeros((T * B,) + tuple(obs_shape), obs_dtype)
        self.reward = np.zeros(T * B, np.float32)
        self.done, self.terminated, self.real = (np.zeros(T * B, np.bool_) for _ in range(3))
        self.env = np.zeros(T * B, np.int64)
        self.stage = [np.zeros((B,) + tuple(obs_shape), obs_dtype), np.zeros(B, np.float32)] + [
            np.zeros(B, np.bool_) for _ in range(3)]
        self.pending = np.full(self.N, -1)  # each env's slot whose outcome has not arrived
        boundary.previous_done[:] = True  # the reset observations are no transitions
        envs.async_reset()

    def recv(self, t: int):
        """One recv: books the outcomes into their slots and opens slots t*B .. t*B+B-1."""
        raw_obs, reward, term, trunc, info = self.envs.recv()
        ids = np.asarray(info["env_id"], np.int64)
        stage_obs, stage_reward, stage_done, stage_term, stage_real = self.stage
        self.boundary.step(raw_obs, reward, term, trunc, *self.stage, env_ids=ids,
                           **episode_bookkeeping(self.family, term, trunc, info))
        slots = self.pending[ids]
        done_before = slots >= 0
        for array, values in ((self.reward, stage_reward), (self.done, stage_done), (self.terminated, stage_term),
                              (self.real, stage_real)):
            array[slots[done_before]] = values[done_before]
        new = np.arange(t * self.B, (t + 1) * self.B)
        self.obs[new] = stage_obs
        self.env[new] = ids
        self.real[new] = False  # until the outcome arrives
        self.pending[ids] = new
        return ids, new

    def advantages(self, values: torch.Tensor, gamma: float, gae_lambda: float, gae) -> Tuple[torch.Tensor, torch.Tensor]:
        """GAE per environment over the slots of this rollout: each env's complete slots, in order,
        right-aligned in an [L, N] layout whose last_value is the value of its in-flight slot."""
        counts = np.bincount(self.env, minlength=self.N) - 1  # complete slots per env
        L = max(int(counts.max()), 1)
        index = np.full((L, self.N), -1)
        last = np.full(self.N, -1)
        for e in range(self.N):
            slots = np.flatnonzero(self.env == e)
            if len(slots) == 0:
                continue
            last[e] = slots[-1]
            if len(slots) > 1:
                index[L - len(slots) + 1:, e] = slots[:-1]
        pad = index < 0
        idx = torch.as_tensor(np.where(pad, 0, index), device=self.device)
        padded = torch.as_tensor(pad, device=self.device)
        take = lambda x: torch.as_tensor(x, device=self.device)[idx]  # noqa: E731
        last_value = torch.where(torch.as_tensor(last >= 0, device=self.device),
                                 values[torch.as_tensor(np.maximum(last, 0), device=self.device)], torch.zeros_like(values[:self.N]))
        # Padding rows are treated like dummy reset steps: they neither bootstrap nor carry a trace.
        adv, ret = rollout_advantages(take(self.reward).to(values.dtype), values[idx], take(self.done),
                                      take(self.terminated), take(self.real) & ~padded, last_value, gamma, gae_lambda, gae)
        flat_adv, flat_ret = torch.zeros_like(values), torch.zeros_like(values)
        keep = ~padded
        flat_adv[idx[keep]] = adv[keep]
        flat_ret[idx[keep]] = ret[keep]
        return flat_adv, flat_ret


class Collector:
    """One rank's rollouts: ``T`` steps of ``N`` environments (``T`` recv rounds of ``B`` in async
    mode) through ``boundary``, the actions from ``agent`` (its ``head``,
    :class:`fastppo.agent.ActionHead`, says their shape and how they reach the environments). The
    storage of the policy's outputs (``actions``, ``logprobs``, ``values``) lives on ``device``;
    ``log_actions`` keeps every action sent, for a resume that replays them (sync environments).
    ``mask_source``: None, or where the environments give action masks (``"info"`` or
    ``"method"``, :func:`fastppo.envs.action_mask_source`), which the policy then samples under."""

    def __init__(self, envs, boundary: EnvStepBoundary, agent, family: str, num_steps: int, device: torch.device,
                 slots: Tuple[int, ...], log_actions: bool = False, mask_source: Optional[str] = None):
        self.envs, self.boundary, self.agent, self.family, self.device = envs, boundary, agent, family, device
        self.T, self.N = num_steps, boundary.N
        self.obs_shape = tuple(envs.observation_space.shape)
        self.head = getattr(agent, "head", None) or action_head(envs.action_space)
        self.action_shape, self.continuous = self.head.action_shape, self.head.continuous
        if mask_source is not None and not self.head.maskable:
            raise ValueError(f"action masks select among Discrete or MultiDiscrete actions; this policy's head is "
                             f"{self.head.kind}")
        self.mask_source = mask_source
        self.batch_size = int(np.prod(slots))
        self.actions = torch.zeros(slots + self.action_shape, dtype=self.head.action_dtype, device=device)
        self.logprobs = torch.zeros(slots, device=device)
        self.values = torch.zeros(slots, device=device)
        self.log_actions, self.action_log = log_actions, []  # one [T, N, ...] array of actions per rollout
        self.raw_obs = None  # the environments' last observations, as they returned them

    def to_env(self, action: torch.Tensor) -> np.ndarray:
        """The environments' actions (the head's :meth:`~fastppo.agent.ActionHead.to_env`): int32
        (plus the space's start), float32 clipped to the bounds, or squashed into them."""
        return self.head.to_env(action)

    def start(self) -> None:
        """Takes the environments' first observations (a new run)."""

    def resume(self, checkpoint: dict) -> None:
        """Continues from a checkpoint of this rank: its normalization statistics and finished
        episodes, with the environments started afresh (the default)."""
        self.boundary.load_statistics(checkpoint["boundary"])
        self.start()

    def state(self) -> dict:
        """What a checkpoint keeps of the environments (beyond the boundary's state)."""
        return {}

    def collect(self, timing: Dict[str, float]) -> int:
        """Fills the rollout storage, adding the seconds spent in the environments and in the policy
        to ``timing["env"]`` / ``timing["inference"]``; returns the environment steps taken."""
        raise NotImplementedError

    def batch(self, gamma: float, gae_lambda: float, gae=fastppo.gae, timing: Optional[Dict[str, float]] = None) -> Batch:
        """The rollout just collected with its advantages and returns (the seconds to
        ``timing["gae"]``), flattened to rows."""
        raise NotImplementedError


class _SyncCollector(Collector):
    """Sync environments: a ``[T + 1, N]`` observation storage in host memory (pinned on a GPU run,
    so the per-step copies are asynchronous) and ``[T, N]`` rewards, dones, terminations and
    real-step flags, written by the boundary; row ``T``'s observation starts the next rollout. With
    a ``mask_source``, ``action_masks`` bool ``[T, N, A]``: the legal actions of each step."""

    def __init__(self, envs, boundary, agent, family, num_steps, device, log_actions=False, mask_source=None):
        super().__init__(envs, boundary, agent, family, num_steps, device, (num_steps, boundary.N), log_actions,
                         mask_source)
        T, N = self.T, self.N
        self.obs = torch.zeros((T + 1, N) + self.obs_shape, dtype=torch.uint8 if family == "atari" else torch.float32,
                               pin_memory=device.type == "cuda").numpy()
        self.reward = np.zeros((T, N), np.float32)
        self.done, self.terminated, self.real = (np.zeros((T, N), np.bool_) for _ in range(3))
        self._rolled = False  # whether row T is the next rollout's first observation
        self.raw_obs, info = envs.reset()
        self.action_masks = self.next_mask = None
        if mask_source is not None:
            self.action_masks = np.ones((T, N, self.head.n_out), np.bool_)
            self._read_mask(info)  # the legal actions of the first observations

    def _read_mask(self, info) -> None:
        """Takes the legal actions of the environments' next step from their last reset / step."""
        if self.mask_source is not None:
            self.next_mask = read_action_masks(self.envs, self.mask_source, info, self.N, self.head.n_out)

    def _mask_at(self, step: int) -> dict:
        """Stores the legal actions of step ``step`` and returns them as the agent's keyword argument
        (``action_mask``, bool ``[N, A]`` on the device), or no argument without masks."""
        if self.action_masks is None:
            return {}
        self.action_masks[step] = self.next_mask
        return dict(action_mask=torch.from_numpy(self.action_masks[step]).to(self.device, non_blocking=True))

    def _batch_masks(self) -> Optional[torch.Tensor]:
        """The rollout's legal actions as rows, bool ``[T * N, A]``, or None."""
        if self.action_masks is None:
            return None
        return torch.from_numpy(self.action_masks).to(self.device).reshape(self.T * self.N, -1)

    def _next_rollout(self) -> None:
        if self._rolled:
            self.obs[0] = self.obs[self.T]
            self._rolled = False

    def _new_env_actions(self) -> np.ndarray:
        env_actions = np.zeros((self.T, self.N) + self.action_shape, self.head.env_dtype)
        if self.log_actions:
            self.action_log.append(env_actions)
        return env_actions

    def start(self) -> None:
        self.boundary.prime(self.raw_obs, self.obs[0])

    def resume(self, checkpoint: dict) -> None:
        if "actions" not in checkpoint:
            return super().resume(checkpoint)
        # A checkpoint with the actions sent so far: the environments, started from the same seeds,
        # are brought back to it by replaying every one.
        logged = np.asarray(checkpoint["actions"])
        for a in logged:
            self.raw_obs, _, _, _, info = self.envs.step(a)
        if len(logged):
            self._read_mask(info)
        if not np.array_equal(np.asarray(self.raw_obs), np.asarray(checkpoint["raw_obs"])):
            raise CheckpointError(f"replaying {len(logged)} logged steps did not reproduce the environments' state")
        self.action_log = [np.asarray(logged)]
        self.boundary.load_state_dict(checkpoint["boundary"])
        self.obs[0] = checkpoint["next_obs"]
        self._rolled = False

    def state(self) -> dict:
        if not self.log_actions:
            return {}
        actions = np.concatenate(self.action_log) if self.action_log else np.zeros((0, self.N) + self.action_shape)
        return dict(actions=actions, raw_obs=np.asarray(self.raw_obs),
                    next_obs=self.obs[self.T if self._rolled else 0].copy())

    def batch(self, gamma, gae_lambda, gae=fastppo.gae, timing=None) -> Batch:
        t0 = time.perf_counter()
        # On the CPU these tensors share the storage; on a GPU they are copied once per rollout.
        rewards, dones, terminated, real = (torch.from_numpy(x).to(self.device)
                                            for x in (self.reward, self.done, self.terminated, self.real))
        obs = torch.from_numpy(self.obs).to(self.device)
        with torch.no_grad():
            next_value = self.agent.get_value(obs[self.T])
            advantages, returns = rollout_advantages(rewards, self.values, dones, terminated, real, next_value,
                                                     gamma, gae_lambda, gae)
        if timing is not None:
            timing["gae"] += time.perf_counter() - t0
        self._rolled = True
        return Batch(obs[:self.T].reshape((-1,) + self.obs_shape), self.actions.reshape((-1,) + self.action_shape),
                     self.logprobs.reshape(-1), advantages.reshape(-1), returns.reshape(-1), self.values.reshape(-1),
                     real.reshape(-1), self._batch_masks())


class SyncFusedCollector(_SyncCollector):
    """Sync environments and the fused actor-critic ``fused`` (:class:`fastppo.policy.FusedActorCritic`
    over ``agent``): a step is one call into the policy and one into the boundary, both writing
    into the storage bound to them. With a ``mask_source`` the policy reads each step's legal
    actions from ``action_masks[t]``, written just before."""

    def __init__(self, envs, boundary, agent, fused, family, num_steps, device, log_actions=False, mask_source=None):
        super().__init__(envs, boundary, agent, family, num_steps, device, log_actions, mask_source)
        _attach_fused(self, fused)

    def collect(self, timing):
        self._next_rollout()
        _fused_steps(self, timing)
        return self.T * self.N


def _attach_fused(collector: _SyncCollector, fused) -> None:
    """Makes a sync collector's steps calls into the fused policy ``fused`` and the boundary's
    :meth:`~fastppo.envstep.EnvStepBoundary.step_at`, both writing into the collector's storage."""
    collector.fused = fused
    if collector.continuous:
        fused.set_action_bounds(collector.envs.action_space.low, collector.envs.action_space.high)
    # the first action of each discrete component, added to what the policy writes (int32, from 0)
    start = collector.head.start if not collector.continuous else None
    collector.start_offset = (np.asarray(start, np.int32).reshape(collector.action_shape) if start and any(start)
                              else None)
    collector.boundary.bind_rollout(collector.obs, collector.reward, collector.done, collector.terminated,
                                    collector.real)


def _fused_steps(c: _SyncCollector, timing: Dict[str, float], state: Optional[torch.Tensor] = None,
                 starts: Optional[np.ndarray] = None) -> None:
    """A rollout of the sync collector ``c`` (:func:`_attach_fused`'s): the whole rollout's sampling
    noise in one call, then per step one call into the fused policy, which writes the action,
    log-prob and value into the rollout and the env's action beside them, and one into the boundary.
    A recurrent policy's ``state`` ``[K, N, H]`` is carried from step to step in place; ``starts``
    ``[T, N]`` (row 0 set by the caller) receives where it is reset: after a dummy reset step."""
    noise = (torch.randn if c.continuous else torch.rand)((c.T, c.N, c.fused.n_out))
    env_actions = c._new_env_actions()
    masks = c.action_masks
    act_step = c.fused.bind_rollout(c.obs, noise, c.actions, c.logprobs, c.values, env_actions, masks, state=state,
                                    starts=starts)
    env_step, step_at, perf_counter = c.envs.step, c.boundary.step_at, time.perf_counter
    start, real, logical_not = c.start_offset, c.real, np.logical_not
    raw_obs = c.raw_obs
    for step in range(c.T):
        t0 = perf_counter()
        if masks is not None:
            masks[step] = c.next_mask
        if starts is not None and step:
            logical_not(real[step - 1], out=starts[step])  # after a dummy step: a new episode
        act_step(step)
        if start is not None:
            env_actions[step] += start
        t1 = perf_counter()
        raw_obs, reward, term, trunc, info = env_step(env_actions[step])
        step_at(step, raw_obs, reward, term, trunc)
        if masks is not None:
            c._read_mask(info)
        timing["env"] += perf_counter() - t1
        timing["inference"] += t1 - t0
    c.raw_obs = raw_obs


class SyncTorchCollector(_SyncCollector):
    """Sync environments and the torch agent: one ``get_action_and_value`` and one boundary step
    per environment step."""

    def _store_and_step(self, step, action, logprob, value, env_actions, timing, t0) -> None:
        """Keeps the agent's output for step ``step``, steps the environments with its action and
        the boundary with their answer; the time since ``t0`` goes to inference, the step's to env."""
        self.values[step], self.actions[step], self.logprobs[step] = value, action, logprob
        env_action = env_actions[step] = self.to_env(action)
        t1 = time.perf_counter()
        self.raw_obs, reward, term, trunc, info = self.envs.step(env_action)
        self.boundary.step(self.raw_obs, reward, term, trunc, self.obs[step + 1], self.reward[step], self.done[step],
                           self.terminated[step], self.real[step], **episode_bookkeeping(self.family, term, trunc, info))
        self._read_mask(info)
        timing["env"] += time.perf_counter() - t1
        timing["inference"] += t1 - t0

    def collect(self, timing):
        self._next_rollout()
        obs = torch.from_numpy(self.obs)
        env_actions = self._new_env_actions()
        perf_counter = time.perf_counter
        for step in range(self.T):
            t0 = perf_counter()
            mask = self._mask_at(step)
            with torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(obs[step].to(self.device, non_blocking=True),
                                                                            **mask)
            self._store_and_step(step, action, logprob, value, env_actions, timing, t0)
        return self.T * self.N


class SyncRecurrentCollector(SyncTorchCollector):
    """Sync environments and a recurrent agent: one ``get_action_and_value`` and one boundary step
    per environment step, the agent's state ``[K, N, H]`` carried from each step to the next. The
    state is reset to zeros before a step whose observation starts an episode: the first of a run
    (or of a resume with fresh environments), and the step after each dummy reset step (which,
    from the ended episode's final observation, still continues that episode's state). A rollout
    keeps the state it began with and where the resets fell (``starts`` ``[T, N]``), which the
    update's sequence pass starts from; a checkpoint keeps the state after its last step."""

    def __init__(self, envs, boundary, agent, family, num_steps, device, log_actions=False, mask_source=None,
                 fused=None):
        super().__init__(envs, boundary, agent, family, num_steps, device, log_actions, mask_source)
        self.starts = np.zeros((self.T, self.N), np.bool_)
        self.hidden = agent.initial_state(self.N, device)
        self.first_hidden = self.hidden
        self.next_start = np.ones(self.N, np.bool_)  # whether the next step's observation starts an episode
        self.fused = fused
        if fused is not None:  # each step one call into the fused policy (its LSTMs' step in C++)
            _attach_fused(self, fused)

    def start(self) -> None:
        super().start()
        self.hidden = self.agent.initial_state(self.N, self.device)
        self.next_start[:] = True

    def resume(self, checkpoint: dict) -> None:
        super().resume(checkpoint)  # fresh environments: start() (new episodes, zero state)
        if "actions" in checkpoint:  # the environments replayed to the checkpoint: their episodes go on
            saved = torch.as_tensor(checkpoint["recurrent_state"])
            if saved.shape != self.hidden.shape:
                raise CheckpointError(f"the checkpoint's recurrent state has shape {tuple(saved.shape)}; this run's "
                                      f"agent has {tuple(self.hidden.shape)}")
            self.hidden = saved.to(self.hidden.device, self.hidden.dtype)
            self.next_start[:] = np.asarray(checkpoint["episode_start"], np.bool_)

    def state(self) -> dict:
        return dict(super().state(), recurrent_state=self.hidden.cpu().clone(), episode_start=self.next_start.copy())

    def collect(self, timing):
        self._next_rollout()
        obs = torch.from_numpy(self.obs)
        starts = torch.from_numpy(self.starts)
        self.starts[0] = self.next_start
        if self.fused is not None:
            self.first_hidden = self.hidden.clone()  # the fused steps update self.hidden in place
            _fused_steps(self, timing, state=self.hidden, starts=self.starts)
            self.next_start = ~self.real[self.T - 1]
            return self.T * self.N
        env_actions = self._new_env_actions()
        perf_counter = time.perf_counter
        self.first_hidden = self.hidden
        for step in range(self.T):
            t0 = perf_counter()
            if step:
                np.logical_not(self.real[step - 1], out=self.starts[step])  # after a dummy step: a new episode
            mask = self._mask_at(step)
            with torch.no_grad():
                action, logprob, _, value, self.hidden = self.agent.get_action_and_value(
                    obs[step].to(self.device, non_blocking=True), self.hidden, starts[step].to(self.device), **mask)
            self._store_and_step(step, action, logprob, value, env_actions, timing, t0)
        self.next_start = ~self.real[self.T - 1]
        return self.T * self.N

    def batch(self, gamma, gae_lambda, gae=fastppo.gae, timing=None) -> SequenceBatch:
        t0 = time.perf_counter()
        rewards, dones, terminated, real = (torch.from_numpy(x).to(self.device)
                                            for x in (self.reward, self.done, self.terminated, self.real))
        obs = torch.from_numpy(self.obs).to(self.device)
        next_start = torch.from_numpy(self.next_start).to(self.device)
        with torch.no_grad():  # the value of row T after the rollout's state (reset there if it starts an episode)
            if self.fused is not None:  # one fused step from a copy of the state (the next rollout starts from it)
                next_value = self.fused.act(obs[self.T], state=self.hidden.clone(), start=next_start)[2]
            else:
                next_value = self.agent.get_value(obs[self.T], self.hidden, next_start)
            advantages, returns = rollout_advantages(rewards, self.values, dones, terminated, real, next_value,
                                                     gamma, gae_lambda, gae)
        if timing is not None:
            timing["gae"] += time.perf_counter() - t0
        self._rolled = True
        rows = Batch(obs[:self.T].reshape((-1,) + self.obs_shape), self.actions.reshape((-1,) + self.action_shape),
                     self.logprobs.reshape(-1), advantages.reshape(-1), returns.reshape(-1), self.values.reshape(-1),
                     real.reshape(-1), self._batch_masks())
        return SequenceBatch(rows, torch.from_numpy(self.starts.copy()).to(self.device), self.first_hidden)


class AsyncCollector(Collector):
    """EnvPool's async mode: ``T`` rounds of ``recv`` (``B`` environments' outcomes into
    :class:`AsyncRollout`'s slots), the torch agent on their observations, ``send``."""

    def __init__(self, envs, boundary, agent, family, num_steps, async_batch_size, device):
        super().__init__(envs, boundary, agent, family, num_steps, device, (num_steps * async_batch_size,))
        obs_dtype = np.uint8 if family == "atari" else np.float32
        self.slots = AsyncRollout(envs, boundary, family, num_steps, async_batch_size, self.obs_shape, obs_dtype, device)

    def resume(self, checkpoint: dict) -> None:
        self.boundary.load_statistics(checkpoint["boundary"])  # the slots start afresh

    def collect(self, timing):
        slots_of, steps, perf_counter = self.slots, 0, time.perf_counter
        slots_of.pending[:] = -1  # outcomes of the last rollout's in-flight slots are not stored
        for step in range(self.T):
            t1 = perf_counter()
            ids, slots = slots_of.recv(step)
            t0 = perf_counter()
            timing["env"] += t0 - t1
            steps += len(ids)
            obs = torch.from_numpy(slots_of.obs[slots]).to(self.device)
            with torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(obs)
            flat = torch.as_tensor(slots, device=self.device)
            self.values[flat], self.actions[flat], self.logprobs[flat] = value, action.to(self.actions.dtype), logprob
            self.envs.send(self.to_env(action), ids.astype(np.int32))
            timing["inference"] += perf_counter() - t0
        return steps

    def batch(self, gamma, gae_lambda, gae=fastppo.gae, timing=None) -> Batch:
        t0 = time.perf_counter()
        with torch.no_grad():
            advantages, returns = self.slots.advantages(self.values, gamma, gae_lambda, gae)
        if timing is not None:
            timing["gae"] += time.perf_counter() - t0
        return Batch(torch.from_numpy(self.slots.obs).to(self.device), self.actions, self.logprobs, advantages, returns,
                     self.values, torch.from_numpy(self.slots.real).to(self.device))


def make_collector(args, envs, agent, family: str, device: torch.device, fused=None, group=None) -> Collector:
    """The collector for ``args`` (``fastppo.train.Args``, one rank's share): async mode when
    ``async_batch_size`` is set, else sync with a recurrent ``agent``, else sync with the fused policy
    ``fused`` when given, else sync torch; with its env step boundary (the observation and reward
    normalization of ``args``, by default the MuJoCo preset's; with a data-parallel
    ``group`` the statistics are deferred, to be merged over the ranks after each rollout), and the
    environments' action masks where ``args.action_masks`` turns them on
    (:func:`fastppo.config.action_masks_on`)."""
    from fastppo.config import action_masks_on

    source = action_mask_source(envs)
    head = getattr(agent, "head", None) or action_head(envs.action_space)
    if not action_masks_on(getattr(args, "action_masks", None) or "auto", head, source, args.env_id):
        source = None
    if source is not None and args.async_batch_size is not None:
        raise ValueError("action masks are read by the sync collectors: --async-batch-size is set (--action-masks off "
                         "ignores them)")
    normalize_obs, normalize_reward = normalization(args, family)
    boundary = EnvStepBoundary(args.num_envs, envs.observation_space.shape, normalize_obs=normalize_obs,
                               normalize_reward=normalize_reward, gamma=args.gamma)
    if group is not None:
        boundary.defer_stats()  # the ranks' statistics are merged after each rollout, so all normalize alike
    if args.async_batch_size is not None:
        return AsyncCollector(envs, boundary, agent, family, args.num_steps, args.async_batch_size, device)
    if getattr(agent, "recurrent", False):
        return SyncRecurrentCollector(envs, boundary, agent, family, args.num_steps, device, args.resume_replay, source,
                                      fused)
    if fused is not None:
        return SyncFusedCollector(envs, boundary, agent, fused, family, args.num_steps, device, args.resume_replay,
                                  source)
    return SyncTorchCollector(envs, boundary, agent, family, args.num_steps, device, args.resume_replay, source)


def normalization(args, family: str) -> Tuple[bool, bool]:
    """Whether the observations and the rewards of a run of ``args`` are normalized: its
    ``normalize_obs`` / ``normalize_reward``, or where they are unset (settings that were not
    resolved, checkpoints of earlier runs) the env family's (the MuJoCo preset's normalization)."""
    default = family == "mujoco"
    obs, reward = getattr(args, "normalize_obs", None), getattr(args, "normalize_reward", None)
    return default if obs is None else bool(obs), default if reward is None else bool(reward)
