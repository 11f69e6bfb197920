"""Environments for the trainer: EnvPool's batched envs (sync and async), tasks made from EnvPool's
by keeping some observation entries (``CartPoleNoVel-v1``), a gymnasium vector-env fallback for
tasks EnvPool lacks, the env family that picks a preset and a network, what the env step boundary
needs to know of Atari's episodes, and where the environments give the legal actions of each step
(action masks). (The rollouts over them are in :mod:`fastppo.rollout`.)

Action masks: a task of Discrete or MultiDiscrete actions may say which actions are legal at each
step, as sb3-contrib's ``MaskablePPO`` reads them: in the info dict of ``reset`` and ``step``
(``info["action_mask"]``, bool or 0/1 ``[A]`` per environment, ``[num_envs, A]`` batched; ``A`` is
``n`` or ``sum(nvec)``), or from an ``action_masks()`` method of the environment (reached through
its wrappers). EnvPool's own tasks give none.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np


def _envpool_ids() -> set:
    import envpool

    return set(envpool.list_all_envs())


# Partially observed tasks: an EnvPool task with only some observation entries kept.
# CartPoleNoVel-v1 is rl-baselines3-zoo's (its MaskVelocityWrapper): CartPole-v1 without the cart's
# and the pole's velocities (entries 1 and 3), so that a policy must infer them from the past;
# rl-baselines3-zoo zeroes those entries, here they are left out (the same information).
OBSERVATION_SUBSETS = {"CartPoleNoVel-v1": ("CartPole-v1", (0, 2))}


def env_family(env_id: str) -> str:
    """classic, atari or mujoco (continuous control): picks the preset and the network."""
    if env_id in OBSERVATION_SUBSETS:
        return env_family(OBSERVATION_SUBSETS[env_id][0])
    if env_id in _envpool_ids():
        import envpool

        spec = envpool.make_spec(env_id)
        if hasattr(spec.config, "episodic_life") and hasattr(spec.config, "reward_clip"):
            return "atari"
        return "mujoco" if len(spec.action_space.shape) > 0 else "classic"
    import gymnasium as gym

    if ":" in env_id:  # MODULE:ID: a task of the user's own, registered when MODULE is imported
        import_env_module(env_id)
    if env_id.rpartition(":")[2] in gym.registry:  # the gymnasium vector-env fallback
        probe = gym.make(env_id)
        continuous = isinstance(probe.action_space, gym.spaces.Box)
        probe.close()
        return "mujoco" if continuous else "classic"
    close = sorted(e for e in _envpool_ids() if env_id.split("-")[0].lower() in e.lower())[:5]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"--env-id {env_id!r} is not an EnvPool or gymnasium task{hint}")


def import_env_module(env_id: str) -> None:
    """Imports the module of a ``MODULE:ID`` task id (which registers ``ID`` with gymnasium), as
    ``gymnasium.make`` does; a module that cannot be imported or registers no ``ID`` is a ValueError."""
    import importlib

    import gymnasium as gym

    import os
    import sys

    module, _, name = env_id.rpartition(":")
    # The working directory, as `python -m` puts it first on the path (a console script's path
    # starts with the script's own folder instead): a module beside the user's command imports.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"--env-id {env_id!r}: cannot import {module!r} ({err}); MODULE:ID needs MODULE on the "
                         "Python path (installed, or in the working directory)") from err
    if name not in gym.registry:
        raise ValueError(f"--env-id {env_id!r}: importing {module!r} registered no gymnasium task {name!r} "
                         f"(it should call gymnasium.register(id={name!r}, entry_point=...))")


def single_env_mask_source(env, seed: int = 0) -> Optional[str]:
    """Where one gymnasium environment gives its action masks (see :func:`action_mask_source`):
    ``"info"`` when its ``reset(seed=seed)`` info holds ``"action_mask"``, else ``"method"`` when it
    (or an env it wraps) has an ``action_masks()`` method, else None. Only Discrete and
    MultiDiscrete action spaces are asked (resetting the environment once)."""
    space = env.action_space
    if not (hasattr(space, "nvec") or (tuple(space.shape) == () and hasattr(space, "n"))):
        return None
    _, info = env.reset(seed=seed)
    if isinstance(info, dict) and "action_mask" in info:
        return "info"
    try:
        method = env.get_wrapper_attr("action_masks")
    except AttributeError:
        method = None
    return "method" if callable(method) else None


def action_mask_source(envs) -> Optional[str]:
    """Where the batched environments ``envs`` give the legal actions of each step: ``"info"``
    (``info["action_mask"]`` ``[num_envs, A]`` of ``reset`` and ``step``), ``"method"`` (their
    ``action_masks()``, ``[num_envs, A]``) or None (no masks: EnvPool's tasks). Read from
    ``envs.action_mask_source`` (:class:`GymnasiumVecEnv` sets it; set it on an environment object of
    your own to give masks)."""
    return getattr(envs, "action_mask_source", None)


def read_action_masks(envs, source: str, info, rows: int, width: int) -> np.ndarray:
    """The legal actions the environments ``envs`` gave with their last ``reset`` / ``step``
    (whose info dict is ``info``), from ``source`` (:func:`action_mask_source`): bool ``[rows,
    width]``, C-contiguous. An environment that gave none, or masks of another size, is a ValueError."""
    if source == "info":
        mask = info.get("action_mask") if isinstance(info, dict) else None
        given = info.get("_action_mask") if isinstance(info, dict) else None  # gymnasium's vector env: who gave it
        if mask is None or (given is not None and not np.all(given)):
            missing = "every environment" if mask is None else f"environments {np.flatnonzero(~np.asarray(given)).tolist()}"
            raise ValueError(f"{missing} gave no info['action_mask'] at this step, though the task gives action masks "
                             "there; every reset and step must give them (or run with --action-masks off)")
    else:
        mask = envs.action_masks()
    mask = np.asarray(mask)
    if mask.size != rows * width:
        raise ValueError(f"the environments' action masks have shape {mask.shape}; expected [{rows}, {width}] (one "
                         f"entry per action, flat over a MultiDiscrete's components)")
    mask = mask.reshape(rows, width)
    return np.ascontiguousarray(mask if mask.dtype == np.bool_ else mask != 0)


class GymnasiumVecEnv:
    """A gymnasium vector env shown with EnvPool's interface (single-env spaces, reset, step) for
    tasks EnvPool lacks. Its autoreset is next-step, like EnvPool's. ``action_mask_source``: where
    its environments give action masks (:func:`single_env_mask_source` of the first one), and
    :meth:`action_masks` reads them from their ``action_masks()`` methods."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        import gymnasium as gym

        self.envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                                 vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP))
        self.observation_space = self.envs.single_observation_space
        self.action_space = self.envs.single_action_space
        self.seed = seed
        # The first environment's reset with its seed, which reset() repeats: it starts the same.
        self.action_mask_source = single_env_mask_source(self.envs.envs[0], seed)

    def reset(self):
        return self.envs.reset(seed=self.seed)

    def step(self, actions):
        return self.envs.step(actions)

    def action_masks(self) -> np.ndarray:
        """Each environment's ``action_masks()``: ``[num_envs, A]`` (a MultiDiscrete's per-component
        masks laid side by side)."""
        return np.stack([flat_mask(m) for m in self.envs.call("action_masks")])

    def close(self):
        self.envs.close()


def flat_mask(mask) -> np.ndarray:
    """One environment's ``action_masks()`` as a flat array: an array or a list of flags as it is, a
    MultiDiscrete's per-component masks (arrays or lists, of any lengths) laid side by side."""
    try:
        return np.asarray(mask).ravel()  # one conversion: a list of 70 flags is not 70 arrays
    except ValueError:  # per-component masks of different lengths
        return np.concatenate([np.ravel(part) for part in mask])


class ObservationSubset:
    """EnvPool's batched environments with only the observation entries ``keep`` of their vector
    observations (``obs[:, keep]``, a C-contiguous copy); actions, rewards, episodes and every other
    attribute (``send``, ``async_reset``, ``close``, ...) are the wrapped environments'."""

    def __init__(self, envs, keep):
        import gymnasium as gym

        self.envs, self.keep = envs, np.asarray(keep, np.int64)
        space = envs.observation_space
        self.observation_space = gym.spaces.Box(space.low[self.keep], space.high[self.keep], dtype=space.dtype)
        self.action_space = envs.action_space

    def reset(self, *args, **kwargs):
        obs, info = self.envs.reset(*args, **kwargs)
        return self._kept(obs), info

    def step(self, *args, **kwargs):
        obs, reward, terminated, truncated, info = self.envs.step(*args, **kwargs)
        return self._kept(obs), reward, terminated, truncated, info

    def recv(self, *args, **kwargs):
        obs, reward, terminated, truncated, info = self.envs.recv(*args, **kwargs)
        return self._kept(obs), reward, terminated, truncated, info

    def _kept(self, obs: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(obs)[:, self.keep])

    def __getattr__(self, name):
        if name == "envs":  # not set yet (copying, unpickling): no wrapped environments to ask
            raise AttributeError(name)
        return getattr(self.envs, name)


def probe_actions(env_id: str) -> Tuple[object, Optional[str]]:
    """The action space of one environment of the task ``env_id`` and where it gives action masks
    (:func:`action_mask_source`; None for EnvPool's tasks): what ``fastppo train``'s settings are
    checked against before a run starts. A gymnasium task is made and reset once."""
    if env_id in OBSERVATION_SUBSETS:
        return probe_actions(OBSERVATION_SUBSETS[env_id][0])
    if env_id in _envpool_ids():
        import envpool

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precision lowered", category=UserWarning)
            return envpool.make_spec(env_id).action_space, None
    import gymnasium as gym

    if ":" in env_id:
        import_env_module(env_id)
    env = gym.make(env_id)
    try:
        return env.action_space, single_env_mask_source(env)
    finally:
        env.close()


def make_env(args, family: str):
    """The batched environments of ``args`` (its ``env_id``, ``num_envs``, ``seed``, ``env_threads``
    and ``async_batch_size``): EnvPool's (with the kept observation entries of a task of
    :data:`OBSERVATION_SUBSETS`), or gymnasium's vector env for a task EnvPool lacks."""
    if args.env_id in OBSERVATION_SUBSETS:
        base, keep = OBSERVATION_SUBSETS[args.env_id]
        return ObservationSubset(make_env(_with_env_id(args, base), family), keep)
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


def _with_env_id(args, env_id: str):
    """``args`` (a dataclass, or any object with ``env_id``) for another task."""
    import copy
    import dataclasses

    if dataclasses.is_dataclass(args):
        return dataclasses.replace(args, env_id=env_id)
    other = copy.copy(args)
    other.env_id = env_id
    return other


def episode_bookkeeping(family: str, term, trunc, info) -> dict:
    """What ``EnvStepBoundary.step`` needs beyond the step itself. Atari (episodic life): a lost life
    ends the training episode, but the game, and its unclipped score, go on until game over."""
    if family != "atari":
        return {}
    return dict(episode_reward=info["reward"], episode_over=(np.logical_or(term, trunc) & (info["terminated"] == 1)) | trunc)


def __getattr__(name: str):
    # AsyncRollout and rollout_advantages moved to fastppo.rollout (imported here on first use: that
    # module imports this one).
    if name in ("AsyncRollout", "rollout_advantages"):
        from fastppo import rollout

        return getattr(rollout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
