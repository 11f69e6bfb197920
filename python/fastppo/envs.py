"""Environments for the trainer: EnvPool's batched envs (sync and async), a gymnasium vector-env
fallback for tasks EnvPool lacks, the env family that picks a preset and a network, and GAE over an
EnvPool rollout (its next-step auto-reset handled exactly)."""

from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import torch

import fastppo
from fastppo.envstep import EnvStepBoundary


def _envpool_ids() -> set:
    import envpool

    return set(envpool.list_all_envs())


def env_family(env_id: str) -> str:
    """classic, atari or mujoco (continuous control): picks the preset and the network."""
    if env_id in _envpool_ids():
        import envpool

        spec = envpool.make_spec(env_id)
        if hasattr(spec.config, "episodic_life") and hasattr(spec.config, "reward_clip"):
            return "atari"
        return "mujoco" if len(spec.action_space.shape) > 0 else "classic"
    import gymnasium as gym

    if env_id in gym.registry:  # the gymnasium vector-env fallback
        probe = gym.make(env_id)
        continuous = isinstance(probe.action_space, gym.spaces.Box)
        probe.close()
        return "mujoco" if continuous else "classic"
    close = sorted(e for e in _envpool_ids() if env_id.split("-")[0].lower() in e.lower())[:5]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"--env-id {env_id!r} is not an EnvPool or gymnasium task{hint}")


class GymnasiumVecEnv:
    """A gymnasium vector env shown with EnvPool's interface (single-env spaces, reset, step) for
    tasks EnvPool lacks. Its autoreset is next-step, like EnvPool's."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        import gymnasium as gym

        self.envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                                 vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP))
        self.observation_space = self.envs.single_observation_space
        self.action_space = self.envs.single_action_space
        self.seed = seed

    def reset(self):
        return self.envs.reset(seed=self.seed)

    def step(self, actions):
        return self.envs.step(actions)

    def close(self):
        self.envs.close()


def make_env(args, family: str):
    if args.env_id not in _envpool_ids():
        if args.async_batch_size is not None:
            raise ValueError(f"--async-batch-size needs an EnvPool task; {args.env_id!r} runs on gymnasium")
        return GymnasiumVecEnv(args.env_id, args.num_envs, args.seed)
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=args.num_envs, seed=args.seed)
    threads = getattr(args, "env_threads", None)
    if threads is None and family == "classic":
        threads = 1  # a classic-control step is cheaper than a handoff to a worker thread (measured: 1.5x)
    if threads is not None:
        kwargs.update(num_threads=threads)
    if args.async_batch_size is not None:
        kwargs.update(batch_size=args.async_batch_size)
    if family == "atari":
        kwargs.update(episodic_life=True, reward_clip=True)
    with warnings.catch_warnings():  # gymnasium notes that EnvPool's float64 Box bounds become float32
        warnings.filterwarnings("ignore", message=".*precision lowered", category=UserWarning)
        envs = envpool.make(args.env_id, **kwargs)
        envs.observation_space, envs.action_space  # built on first access: inside this block
        return envs


def episode_bookkeeping(family: str, term, trunc, info) -> dict:
    """What ``EnvStepBoundary.step`` needs beyond the step itself. Atari (episodic life): a lost life
    ends the training episode, but the game, and its unclipped score, go on until game over."""
    if family != "atari":
        return {}
    return dict(episode_reward=info["reward"], episode_over=(np.logical_or(term, trunc) & (info["terminated"] == 1)) | trunc)


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



def rollout_advantages(rewards, values, dones, terminated, real, next_value, gamma, gae_lambda, gae=fastppo.gae):
    """GAE over an EnvPool rollout ``[T, N]``. A step that is not ``real`` is the dummy reset step
    after an episode ended: it leads from the final observation to a reset one, so it neither
    bootstraps nor carries the next episode's advantage back (it is masked out of the loss too).
    The real step before it bootstraps from ``values`` of the final observation unless it
    terminated, which is what makes truncation exact."""
    return gae(rewards, values, dones | ~real, next_value, terminated=terminated | ~real, gamma=gamma,
               gae_lambda=gae_lambda)
