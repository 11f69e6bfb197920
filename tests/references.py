"""Plain float64 references the kernels are tested against (numpy only, written for clarity)."""

from __future__ import annotations

import numpy as np

GAMMA, LAM = 0.99, 0.95


def gae_reference(rewards, values, dones, last_value, terminated=None, gamma=GAMMA, lam=LAM):
    """The formula of the design card, in float64, one step at a time."""
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    d = np.asarray(dones, np.float64)
    term = d if terminated is None else np.asarray(terminated, np.float64)
    T = r.shape[0]
    adv = np.zeros_like(r)
    next_adv = np.zeros(r.shape[1:])
    for t in reversed(range(T)):
        next_value = v[t + 1] if t + 1 < T else np.asarray(last_value, np.float64)
        delta = r[t] + gamma * (1.0 - term[t]) * next_value - v[t]
        next_adv = delta + gamma * lam * (1.0 - d[t]) * next_adv
        adv[t] = next_adv
    return adv, adv + v


def rollout(T, *trailing, seed=0, done_p=0.05):
    """Random float64 rollout with dones forced at t = 0 and t = T - 1 in the first env and a
    random share of the dones being truncations (terminated = 0)."""
    rng = np.random.default_rng(seed)
    shape = (T, *trailing)
    rewards = rng.normal(size=shape)
    values = rng.normal(size=shape)
    dones = rng.random(shape) < done_p
    first_env = (slice(None),) + (0,) * len(trailing)
    dones[first_env][0] = True
    dones[first_env][-1] = True
    terminated = dones & (rng.random(shape) < 0.5)
    last_value = rng.normal(size=trailing)
    return rewards, values, dones, terminated, last_value
