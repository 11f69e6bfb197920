"""Small tasks, one per kind of action space, to train ``fastppo train``'s policy heads on in
seconds. Importing this module registers them with gymnasium, so that
``fastppo train --env-id fastppo.toy_envs:InvalidAction-v0`` finds them (on gymnasium's vector env).

- ``InvalidAction-v0``: ``Discrete(8)``. Each step one action is correct and 5 of the 7 others are
  illegal; the observation shows both (float32 ``[16]``: the correct action one-hot, then the
  legal actions as 0/1). Reward +1 for the correct action, 0 for another legal one, -1 for an
  illegal one; 20 steps per episode (truncated). The legal actions come from an ``action_masks()``
  method (bool ``[8]``), as sb3-contrib's ``MaskablePPO`` reads them. A uniform choice among the
  legal actions earns 20/3 per episode, the correct policy 20.
- ``InvalidActionInfo-v0``: the same task with the legal actions in ``info["action_mask"]`` of
  ``reset`` and ``step`` instead of a method.
- ``InvalidActionMulti-v0``: ``MultiDiscrete([3, 4, 5])``, the same game per component: one correct
  action, all but one of the others illegal (so 2 legal each); the observation is each component's
  correct action one-hot and its legal actions (float32 ``[24]``), the legal actions come flat from
  ``action_masks()`` (bool ``[12]``, the components side by side); the reward is the mean over the
  components of +1 / 0 / -1. A uniform legal choice earns 10 per episode, the correct policy 20.
- ``BoundedTarget-v0``: ``Box(low=[-2, 0.5], high=[3, 1.5])``. Each step a target point inside the
  bounds is drawn and shown (float32 ``[2]``, scaled to [-1, 1]); the reward is minus the distance
  from the action to it, divided by the box's size; 20 steps per episode. An action outside the
  bounds is a ValueError: the task checks that a policy's actions stay inside them.

Each environment counts the illegal actions it received (``illegal_actions``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

__all__ = ["BoundedTarget", "InvalidAction"]


class InvalidAction(gym.Env):
    """Pick the correct action among the legal ones, each step (see the module's docstring).

    Args:
        nvec: None for a ``Discrete(n)`` task; the components' sizes for a ``MultiDiscrete`` one.
        n: the actions of the ``Discrete`` task.
        illegal: how many of the other actions are illegal at each step (of each component:
            ``n_k - 2`` with ``nvec``, leaving two legal ones).
        length: steps per episode.
        mask_in: ``"method"`` (``action_masks()``) or ``"info"`` (``info["action_mask"]``).
    """

    metadata = {"render_modes": []}

    def __init__(self, nvec=None, n: int = 8, illegal: int = 5, length: int = 20, mask_in: str = "method"):
        if mask_in not in ("method", "info"):
            raise ValueError(f"InvalidAction: mask_in must be method or info, got {mask_in!r}")
        self.multi = nvec is not None
        self.nvec = [int(k) for k in nvec] if self.multi else [int(n)]
        if self.multi and min(self.nvec) < 2:
            raise ValueError(f"InvalidAction: every component needs >= 2 actions, got nvec {self.nvec}")
        if not self.multi and not 0 <= illegal < n:
            raise ValueError(f"InvalidAction: illegal must be in [0, n) = [0, {n}), got {illegal}")
        self.illegal = [k - 2 for k in self.nvec] if self.multi else [int(illegal)]
        self.length, self.mask_in = length, mask_in
        self.action_space = gym.spaces.MultiDiscrete(self.nvec) if self.multi else gym.spaces.Discrete(n)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (2 * sum(self.nvec),), np.float32)
        self.t = 0
        self.illegal_actions = 0
        self.target = np.zeros(len(self.nvec), np.int64)
        self.mask = np.ones(sum(self.nvec), np.bool_)

    def _draw(self) -> None:
        """A new correct action and legal set for each component."""
        parts = []
        for k, (n, illegal) in enumerate(zip(self.nvec, self.illegal)):
            self.target[k] = self.np_random.integers(n)
            others = np.delete(np.arange(n), self.target[k])
            legal = np.ones(n, np.bool_)
            legal[self.np_random.choice(others, illegal, replace=False)] = False
            parts.append(legal)
        self.mask = np.concatenate(parts)

    def _observation(self) -> np.ndarray:
        onehot = np.zeros(sum(self.nvec), np.float32)
        onehot[np.cumsum([0] + self.nvec[:-1]) + self.target] = 1.0
        halves = [np.concatenate([part, legal.astype(np.float32)]) for part, legal in
                  zip(np.split(onehot, np.cumsum(self.nvec)[:-1]), np.split(self.mask, np.cumsum(self.nvec)[:-1]))]
        return np.concatenate(halves)

    def _info(self) -> dict:
        return {"action_mask": self.mask.copy()} if self.mask_in == "info" else {}

    def action_masks(self) -> np.ndarray:
        """The legal actions of the next step: bool ``[sum(nvec)]`` (``[n]`` for Discrete)."""
        if self.mask_in != "method":
            raise AttributeError("this InvalidAction gives its masks in info['action_mask']")
        return self.mask.copy()

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self._draw()
        return self._observation(), self._info()

    def step(self, action):
        actions = np.atleast_1d(np.asarray(action, np.int64))
        offsets = np.cumsum([0] + self.nvec[:-1])
        if actions.shape != (len(self.nvec),) or (actions < 0).any() or (actions >= self.nvec).any():
            raise ValueError(f"InvalidAction: action {action!r} is not in {self.action_space}")
        legal = self.mask[offsets + actions]
        self.illegal_actions += int((~legal).sum())
        reward = float(np.mean(np.where(actions == self.target, 1.0, np.where(legal, 0.0, -1.0))))
        self.t += 1
        self._draw()
        return self._observation(), reward, False, self.t >= self.length, self._info()


class BoundedTarget(gym.Env):
    """Reach a target point inside a Box's bounds; actions outside them are refused (see the
    module's docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, low=(-2.0, 0.5), high=(3.0, 1.5), length: int = 20):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.action_space = gym.spaces.Box(self.low, self.high, dtype=np.float32)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, self.low.shape, np.float32)
        self.length, self.t = length, 0
        self.target = (self.low + self.high) / 2

    def _observation(self) -> np.ndarray:
        return (2 * (self.target - self.low) / (self.high - self.low) - 1).astype(np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.target = self.np_random.uniform(self.low, self.high).astype(np.float32)
        return self._observation(), {}

    def step(self, action):
        action = np.asarray(action, np.float32)
        if action.shape != self.low.shape or not ((self.low <= action) & (action <= self.high)).all():
            raise ValueError(f"BoundedTarget: action {action.tolist()} is outside the bounds "
                             f"[{self.low.tolist()}, {self.high.tolist()}]")
        reward = -float(np.abs((action - self.target) / (self.high - self.low)).sum())
        self.t += 1
        self.target = self.np_random.uniform(self.low, self.high).astype(np.float32)
        return self._observation(), reward, False, self.t >= self.length, {}


gym.register(id="InvalidAction-v0", entry_point=InvalidAction)
gym.register(id="InvalidActionInfo-v0", entry_point=InvalidAction, kwargs=dict(mask_in="info"))
gym.register(id="InvalidActionMulti-v0", entry_point=InvalidAction, kwargs=dict(nvec=(3, 4, 5)))
gym.register(id="BoundedTarget-v0", entry_point=BoundedTarget)
