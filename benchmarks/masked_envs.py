"""sb3-contrib's masked test tasks registered with gymnasium, for ``benchmarks/masked.py``: importing
this module registers them, so that ``fastppo train --env-id benchmarks.masked_envs:ID`` runs them and
sb3-contrib's ``MaskablePPO`` trains on the same ``gymnasium.make(ID)``.

- ``InvalidActionDiscrete-v0``: ``sb3_contrib.common.envs.InvalidActionEnvDiscrete(dim=70,
  n_invalid_actions=55)``, the size of sb3-contrib's own learning test (``tests/test_invalid_actions.py``,
  ``test_identity``: MaskablePPO must reach a mean evaluation return of 90). Each step the state is
  one of 70 values, drawn uniformly; the reward is 1 when the action equals it, else 0; 55 of the 69
  other actions are illegal (bool ``[70]`` from ``action_masks()``). A uniform choice among the 15
  legal actions earns 100/15 (about 6.7) per episode, the identity policy 100.
- ``InvalidActionMultiDiscrete-v0``: ``InvalidActionEnvMultiDiscrete(dims=[2, 3], n_invalid_actions=1)``,
  the size of sb3-contrib's MultiDiscrete test (``test_supports_multi_discrete_action_space``): the
  state is a ``MultiDiscrete([2, 3])`` pair, the reward 1 when both components equal it; one of the
  3 flat actions that are not the state's is illegal (bool ``[5]``, the components side by side). A
  uniform legal choice earns 100/4 (25) per episode, the identity policy 100.

Both episodes last 100 steps: the environments truncate themselves there (``ep_length``, the
default), so no TimeLimit is added. The state is the environments' observation, a ``Discrete`` /
``MultiDiscrete`` value; :class:`OneHotObservation` gives it as float32 one-hot ``[70]`` /
``[2 + 3]``, which is what stable-baselines3's policies make of such an observation
(``preprocess_obs``), so that both trainers' networks see the same input (fastppo's take Box
observations). The environments draw their states from their action space's generator and the
illegal actions from numpy's global one; a reset with a seed seeds the action space too.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

__all__ = ["OneHotObservation", "TASKS", "make_task"]

# id -> (sb3-contrib class name, its keyword arguments)
TASKS = {
    "InvalidActionDiscrete-v0": ("InvalidActionEnvDiscrete", dict(dim=70, n_invalid_actions=55)),
    "InvalidActionMultiDiscrete-v0": ("InvalidActionEnvMultiDiscrete", dict(dims=[2, 3], n_invalid_actions=1)),
}


class OneHotObservation(gym.ObservationWrapper):
    """A ``Discrete(n)`` observation as float32 one-hot ``[n]``; a ``MultiDiscrete(nvec)`` one as
    the components' one-hots side by side, float32 ``[sum(nvec)]``. ``action_masks()`` and every
    other attribute are the wrapped environment's (``get_wrapper_attr``)."""

    def __init__(self, env):
        super().__init__(env)
        space = env.observation_space
        if isinstance(space, gym.spaces.Discrete):
            self.nvec = np.array([space.n], np.int64)
        elif isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim == 1:
            self.nvec = space.nvec.astype(np.int64)
        else:
            raise TypeError(f"OneHotObservation: env.observation_space must be Discrete or a 1-D MultiDiscrete, "
                            f"got {space}")
        self.offsets = np.concatenate([[0], np.cumsum(self.nvec)[:-1]])
        self.observation_space = gym.spaces.Box(0.0, 1.0, (int(self.nvec.sum()),), np.float32)

    def observation(self, observation):
        onehot = np.zeros(self.observation_space.shape, np.float32)
        onehot[self.offsets + np.atleast_1d(np.asarray(observation, np.int64))] = 1.0
        return onehot

    def reset(self, *, seed=None, options=None):
        if seed is not None:  # the states come from the action space's generator
            self.env.unwrapped.action_space.seed(seed)
        return super().reset(seed=seed, options=options)


def make_task(name: str, **kwargs):
    """sb3-contrib's environment ``name`` (from :data:`TASKS`) with one-hot observations."""
    from sb3_contrib.common import envs

    return OneHotObservation(getattr(envs, name)(**kwargs))


for _id, (_name, _kwargs) in TASKS.items():
    gym.register(id=_id, entry_point=make_task, kwargs=dict(name=_name, **_kwargs))
