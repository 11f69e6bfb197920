"""The env step boundary: one ``fastppo._C.EnvStepper`` call per environment step.

``EnvStepBoundary.step`` takes what a batched environment returned and, in compiled code, marks the
dummy reset steps (EnvPool resets an environment on the step after it ended), tracks each env's
episode return and length, normalizes observations with running float64 moments (clipped to
+-clip), scales rewards by the running std of the discounted return (clipped), and writes the
results into the rollout storage slot it is given. Its state is plain numpy, saved in checkpoints.

``EnvBoundary`` is the old name of ``EnvStepBoundary``: it still works, with a DeprecationWarning.
"""

from __future__ import annotations

from collections import deque
from typing import List, Optional, Tuple

import numpy as np

from . import _C
from . import _buffers as B
from ._deprecation import warn_renamed


def merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s merge of two sets of moments ``[3, ...]`` (count, mean, m2), elementwise over
    the trailing shape, in float64: the rule of the compiled ``moments_merge``."""
    (ca, ma, qa), (cb, mb, qb) = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = ca + cb
    safe = np.where(n > 0, n, 1.0)
    d = mb - ma
    merged = np.stack([n, ma + d * (cb / safe), qa + qb + d * d * (ca * cb / safe)])
    return np.where(n > 0, merged, np.stack([ca, ma, qa]))


def _contiguous(x, dtype=None) -> np.ndarray:
    return np.ascontiguousarray(x if dtype is None else np.asarray(x, dtype=dtype))


class EnvStepBoundary:
    """Per-step bookkeeping between ``num_envs`` environments and the rollout storage.

    Args:
        num_envs: N.
        obs_shape: the shape of one observation.
        normalize_obs / normalize_reward: the MuJoCo preset's normalization (CleanRL's wrappers).
        gamma: discount of the return whose running std scales the rewards.
        clip: normalized observations and scaled rewards are clipped to +-clip.
        window: how many recent episodes ``recent_mean_return`` averages.
    """

    def __init__(self, num_envs: int, obs_shape: Tuple[int, ...], normalize_obs: bool = False,
                 normalize_reward: bool = False, gamma: float = 0.99, clip: float = 10.0, window: int = 100):
        self.N, self.obs_shape = num_envs, tuple(obs_shape)
        self.obs_dim = int(np.prod(self.obs_shape)) if self.obs_shape else 1
        self.normalize_obs, self.normalize_reward = normalize_obs, normalize_reward
        self.gamma, self.clip = gamma, clip
        self.obs_count, self.obs_mean, self.obs_m2 = np.zeros(1), np.zeros(self.obs_dim), np.zeros(self.obs_dim)
        self.return_count, self.return_mean, self.return_m2 = np.zeros(1), np.zeros(1), np.zeros(1)
        self.discounted_return = np.zeros(num_envs)
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, np.int64)
        self.previous_done = np.zeros(num_envs, np.bool_)
        self.recent = deque(maxlen=window)
        self.episodes = 0
        self._finished_return = np.zeros(num_envs)
        self._finished_length = np.zeros(num_envs, np.int64)
        self._finished = np.zeros(num_envs, np.bool_)
        # The compiled stepper holds the state arrays above by address: they are updated in place,
        # never rebound.
        self._stepper = _C.EnvStepper(
            num_envs, self.obs_dim, normalize_obs, normalize_reward, gamma, clip, self.obs_count, self.obs_mean,
            self.obs_m2, self.return_count, self.return_mean, self.return_m2, self.discounted_return,
            self.episode_return, self.episode_length, self.previous_done, self._finished_return,
            self._finished_length, self._finished)

    def step(self, obs, reward, terminated, truncated, obs_out: np.ndarray, reward_out: np.ndarray,
             done_out: np.ndarray, terminated_out: np.ndarray, real_out: np.ndarray,
             episode_reward=None, episode_over=None, update_stats: bool = True,
             env_ids=None) -> List[Tuple[float, int]]:
        """Books one step and writes it into the ``*_out`` arrays (C-contiguous numpy: obs_out
        ``[N, *obs_shape]`` float32, or uint8 when observations are neither normalized nor float;
        the others ``[N]`` float32 / bool). ``episode_reward`` (default ``reward``) is what episode
        returns sum; ``episode_over`` (default terminated or truncated) says where episodes end.
        ``env_ids`` (EnvPool's async mode): which environment each of the B rows is; the inputs
        and outputs then have B rows. Returns the (return, length) of the episodes that ended."""
        obs = _contiguous(obs)
        rows = self.N if env_ids is None else len(env_ids)
        if env_ids is not None:
            env_ids = _contiguous(env_ids, np.int32)
            if env_ids.size and (env_ids.min() < 0 or env_ids.max() >= self.N):
                raise ValueError(f"EnvStepBoundary.step: env_ids must be in [0, {self.N}), got {env_ids.tolist()}")
        reward = _contiguous(reward, np.float64 if np.asarray(reward).dtype == np.float64 else np.float32)
        episode_reward = reward if episode_reward is None else _contiguous(
            episode_reward, np.float64 if np.asarray(episode_reward).dtype == np.float64 else np.float32)
        for name, out, shape in (("obs_out", obs_out, (rows,) + self.obs_shape), ("reward_out", reward_out, (rows,)),
                                 ("done_out", done_out, (rows,)), ("terminated_out", terminated_out, (rows,)),
                                 ("real_out", real_out, (rows,))):
            if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or out.shape != shape:
                raise ValueError(f"EnvStepBoundary.step: {name} must be a C-contiguous numpy array of shape {shape}")
        if obs.shape != (rows,) + self.obs_shape:
            raise ValueError(f"EnvStepBoundary.step: obs has shape {obs.shape}; expected {(rows,) + self.obs_shape}")
        count = self._stepper.step(
            rows, obs, reward, _contiguous(terminated, np.bool_), _contiguous(truncated, np.bool_), episode_reward,
            None if episode_over is None else _contiguous(episode_over, np.bool_), update_stats,
            obs_out, reward_out, done_out, terminated_out, real_out, env_ids,
        )
        return self._book_finished(rows) if count else []

    def prime(self, obs, obs_out: np.ndarray, update_stats: bool = True) -> None:
        """Takes the environments' first observations ``obs`` (after a reset) into ``obs_out``
        ``[N, *obs_shape]``: normalized like any other, but no transition, so no reward, return or
        episode is booked (a rollout's row 0 before its first step)."""
        self.previous_done[:] = True
        rows = np.zeros(self.N, np.float32), np.zeros(self.N, np.bool_), np.zeros(self.N, np.bool_)
        outs = [np.zeros(self.N, np.float32)] + [np.zeros(self.N, np.bool_) for _ in range(3)]
        self.step(obs, *rows, obs_out, *outs, update_stats=update_stats)

    def _book_finished(self, rows: int) -> List[Tuple[float, int]]:
        """The (return, length) of the episodes the last step ended, added to the recent ones."""
        idx = np.flatnonzero(self._finished[:rows])
        finished = list(zip(self._finished_return[idx].tolist(), self._finished_length[idx].tolist()))
        self.recent.extend(finished)
        self.episodes += len(finished)
        return finished

    def bind_rollout(self, obs_out: np.ndarray, reward_out: np.ndarray, done_out: np.ndarray,
                     terminated_out: np.ndarray, real_out: np.ndarray) -> None:
        """Binds rollout storage ``[T, N, ...]`` (C-contiguous; obs ``[T + 1, N, *obs_shape]``) so that
        :meth:`step_at` writes row ``t`` by address, checked once here instead of every step."""
        B.require_array("EnvStepBoundary.bind_rollout", "reward_out", reward_out, "numpy")
        T = reward_out.shape[0]
        for name, out, dtype, shape in (("obs_out", obs_out, None, (T + 1, self.N) + self.obs_shape),
                                        ("reward_out", reward_out, ("float32",), (T, self.N)),
                                        ("done_out", done_out, ("bool",), (T, self.N)),
                                        ("terminated_out", terminated_out, ("bool",), (T, self.N)),
                                        ("real_out", real_out, ("bool",), (T, self.N))):
            B.require_contiguous("EnvStepBoundary.bind_rollout", name, out, "numpy", dtype, shape)
        self._bound = (obs_out, reward_out, done_out, terminated_out, real_out)  # kept alive
        self._stepper.bind_rollout(obs_out.ctypes.data, obs_out.strides[0], obs_out,
                                   *(v for x in (reward_out, done_out, terminated_out, real_out)
                                     for v in (x.ctypes.data, x.strides[0])))

    def step_at(self, t: int, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray) -> int:
        """:meth:`step` for a sync env of a classic-control or MuJoCo task writing into row ``t``
        of the storage given to :meth:`bind_rollout` (observations into row ``t + 1``): the
        trainer's per-step call, without per-step argument conversion. Inputs are EnvPool's
        arrays (C-contiguous; anything else is converted). Returns the number of episodes ended."""
        if not (type(obs) is np.ndarray and obs.flags.c_contiguous and obs.shape == (self.N,) + self.obs_shape):
            obs = _contiguous(obs)
            if obs.shape != (self.N,) + self.obs_shape:
                raise ValueError(f"EnvStepBoundary.step_at: obs has shape {obs.shape}; expected {(self.N,) + self.obs_shape}")
        if not (type(reward) is np.ndarray and reward.dtype == np.float32 and reward.flags.c_contiguous):
            reward = _contiguous(reward, np.float64 if np.asarray(reward).dtype == np.float64 else np.float32)
        if not (type(terminated) is np.ndarray and terminated.dtype == np.bool_ and terminated.flags.c_contiguous):
            terminated = _contiguous(terminated, np.bool_)
        if not (type(truncated) is np.ndarray and truncated.dtype == np.bool_ and truncated.flags.c_contiguous):
            truncated = _contiguous(truncated, np.bool_)
        count = self._stepper.step_at(t, obs, reward, terminated, truncated)
        if count:
            self._book_finished(self.N)
        return count

    def defer_stats(self) -> None:
        """From now on each step's observation / return moments go to pending statistics, and
        normalization keeps using the running ones until :meth:`absorb_pending` (data-parallel
        training merges every rank's pending moments at the end of each rollout)."""
        self.obs_pending = [np.zeros(1), np.zeros(self.obs_dim), np.zeros(self.obs_dim)]
        self.return_pending = [np.zeros(1), np.zeros(1), np.zeros(1)]
        self._stepper.defer_stats(*self.obs_pending, *self.return_pending)

    def pending_moments(self) -> Tuple[np.ndarray, np.ndarray]:
        """The pending (count, mean, m2) of the observations ``[3, obs_dim]`` and returns ``[3, 1]``."""
        def rows(count, mean, m2):
            return np.stack([np.broadcast_to(count, mean.shape), mean, m2])
        return rows(*self.obs_pending), rows(*self.return_pending)

    def absorb_pending(self, obs: np.ndarray, ret: np.ndarray) -> None:
        """Merges moments ``[3, obs_dim]`` / ``[3, 1]`` into the running statistics and clears the pending ones."""
        for (count, mean, m2), merged, pending in (
                ((self.obs_count, self.obs_mean, self.obs_m2), obs, self.obs_pending),
                ((self.return_count, self.return_mean, self.return_m2), ret, self.return_pending)):
            total = merge_moments(np.stack([np.broadcast_to(count, mean.shape), mean, m2]), merged)
            count[...], mean[...], m2[...] = total[0][:1], total[1], total[2]
            for x in pending:
                x[...] = 0.0

    def recent_mean_return(self, last: Optional[int] = None) -> Optional[float]:
        """Mean return of the recent episodes (of the ``last`` ones, when given), None before the
        first one ends."""
        episodes = list(self.recent)[-last:] if last else self.recent
        return float(np.mean([r for r, _ in episodes])) if episodes else None

    def obs_variance(self) -> np.ndarray:
        return self.obs_m2 / self.obs_count[0] if self.obs_count[0] > 0 else np.ones_like(self.obs_m2)

    _STATE = ("obs_count", "obs_mean", "obs_m2", "return_count", "return_mean", "return_m2",
              "discounted_return", "episode_return", "episode_length", "previous_done")

    def state_dict(self) -> dict:
        return {name: getattr(self, name).copy() for name in self._STATE} | {
            "recent": list(self.recent), "episodes": self.episodes}

    def load_statistics(self, state: dict) -> None:
        """From a :meth:`state_dict`: the normalization statistics and the finished episodes, not
        the environments' episodes in progress (a resume with fresh environments)."""
        for name in ("obs_count", "obs_mean", "obs_m2", "return_count", "return_mean", "return_m2"):
            getattr(self, name)[...] = state[name]
        self.recent.clear()
        self.recent.extend(tuple(x) for x in state["recent"])
        self.episodes = state["episodes"]

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            getattr(self, name)[...] = state[name]
        self.recent.clear()
        self.recent.extend(tuple(x) for x in state["recent"])
        self.episodes = state["episodes"]


def __getattr__(name: str):
    if name == "EnvBoundary":  # the old name, kept for one release
        warn_renamed("fastppo.envstep.EnvBoundary", "EnvStepBoundary")
        return EnvStepBoundary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
