"""The torch actor-critic of ``fastppo train``, shaped like CleanRL's ``Agent``: MLPs for vector
observations (categorical or state-independent Gaussian policy), the Nature CNN for Atari frames,
with ``get_value`` / ``get_action_and_value``. ``Kernels`` names what fastppo computes in the loop
(advantages, the clipped loss, the policy heads), so that the benchmark suite can swap in eager torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import fastppo

__all__ = ["Agent", "Kernels", "layer_init", "nature_cnn", "sample_and_score"]



def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """CleanRL's initialization: orthogonal weights of gain ``std``, a constant bias."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def nature_cnn(channels: int) -> nn.Sequential:
    """The Nature DQN trunk over ``[B, channels, 84, 84]`` frames (scaled to [0, 1]), 512 features."""
    return nn.Sequential(
        layer_init(nn.Conv2d(channels, 32, 8, stride=4)), nn.ReLU(),
        layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
        layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(),
        layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
    )


def sample_and_score(kernels: "Kernels", out, log_std=None, action=None):
    """The policy head on the actor's output ``out`` ``[..., A]``: logits of a categorical policy,
    or the mean of a Gaussian with ``log_std`` ``[A]``. Samples ``action`` when None (Gumbel-max
    for the categorical, without a distribution object); returns ``(action, logprob, entropy)``."""
    if log_std is not None:
        if action is None:
            action = out + log_std.exp() * torch.randn_like(out)
        logprob, entropy = kernels.normal_logprob_entropy(out, log_std, action)
    else:
        if action is None:  # Gumbel-max: a sample of softmax(out) without a distribution object
            noise = torch.rand_like(out).clamp_(min=torch.finfo(out.dtype).tiny)
            action = (out - torch.log(-torch.log(noise))).argmax(-1)
        logprob, entropy = kernels.categorical_logprob_entropy(out, action.long())
    return action, logprob, entropy


@dataclass(frozen=True)
class Kernels:
    """What fastppo computes in the loop: advantages, the clipped loss and the policy heads. The
    benchmark suite swaps in eager torch versions to measure what the kernels buy end to end."""

    gae: Callable = fastppo.gae
    ppo_loss: Callable = fastppo.ppo_loss
    categorical_logprob_entropy: Callable = fastppo.categorical_logprob_entropy
    normal_logprob_entropy: Callable = fastppo.normal_logprob_entropy
    channels_last: bool = True
    """the Atari CNN's weights in channels-last layout (oneDNN's fast convolutions: 1.3-1.5x on its
    forward and backward here); the eager baseline keeps CleanRL's default layout"""


class Agent(nn.Module):
    """Actor-critic: MLPs for vector observations (categorical or state-independent Gaussian
    policy), the Nature CNN for Atari frames."""

    def __init__(self, obs_shape, action_space, family: str, kernels: Kernels = Kernels()):
        super().__init__()
        self.kernels = kernels
        self.continuous = len(action_space.shape) > 0
        n_out = action_space.shape[0] if self.continuous else int(action_space.n)
        if family == "atari":
            self.trunk = nature_cnn(obs_shape[0])
            self.actor = layer_init(nn.Linear(512, n_out), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1)
            self.scale = 1.0 / 255.0
            if kernels.channels_last:
                self.trunk.to(memory_format=torch.channels_last)
        else:
            n_in = int(np.prod(obs_shape))
            hidden = 64
            self.trunk = nn.Identity()
            self.actor = nn.Sequential(
                layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, n_out), std=0.01),
            )
            self.critic = nn.Sequential(
                layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, 1), std=1.0),
            )
            self.scale = 1.0
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(n_out))

    def features(self, obs):
        return self.trunk(obs.float() * self.scale) if self.scale != 1.0 else self.trunk(obs.float())

    def get_value(self, obs):
        return self.critic(self.features(obs)).squeeze(-1)

    def get_action_and_value(self, obs, action=None):
        h = self.features(obs)
        out = self.actor(h)
        action, logprob, entropy = sample_and_score(self.kernels, out, self.actor_logstd if self.continuous else None,
                                                    action)
        return action, logprob, entropy, self.critic(h).squeeze(-1)
