"""Environments for the trainer: EnvPool's batched envs (sync and async), a gymnasium vector-env
fallback for tasks EnvPool lacks, the env family that picks a preset and a network, and what the
env step boundary needs to know of Atari's episodes. (The rollouts over them are in
:mod:`fastppo.rollout`.)"""

from __future__ import annotations

import warnings

import numpy as np


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
    """The batched environments of ``args`` (its ``env_id``, ``num_envs``, ``seed``, ``env_threads``
    and ``async_batch_size``): EnvPool's, or gymnasium's vector env for a task EnvPool lacks."""
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


def __getattr__(name: str):
    # AsyncRollout and rollout_advantages moved to fastppo.rollout (imported here on first use: that
    # module imports this one).
    if name in ("AsyncRollout", "rollout_advantages"):
        from fastppo import rollout

        return getattr(rollout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
