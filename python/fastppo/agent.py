"""The torch actor-critic of ``fastppo train``, shaped like CleanRL's ``Agent``: MLPs for vector
observations, the Nature CNN for Atari frames, with ``get_value`` / ``get_action_and_value``.
``ActionHead`` is the policy head the action space calls for (categorical, multi-categorical,
Gaussian, tanh-squashed Gaussian) and how its actions reach the environment. ``Kernels`` names what
fastppo computes in the loop (advantages, the clipped loss, the policy heads), so that the benchmark
suite can swap in eager torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import fastppo

__all__ = ["ACTION_MASKS", "ACTIVATIONS", "ActionHead", "Agent", "Kernels", "MlpShape", "SQUASH", "action_head", "layer_init", "nature_cnn",
           "sample_and_score"]

# --squash's choices: the Gaussian of a Box action space as it is (its sample clipped to the bounds when
# sent to the environment: CleanRL's), or squashed by tanh into the bounds.
SQUASH = ("none", "tanh")
# --action-masks's choices.
ACTION_MASKS = ("auto", "on", "off")

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


@dataclass(frozen=True)
class ActionHead:
    """The policy head of an action space, and how its actions reach the environment.

    ``kind``, with the actor's output, the stored action and the environment's action:

    - ``categorical`` (``Discrete(n)``): logits ``[..., n]``; action int64 ``[...]``; the
      environment gets int32 ``action + start``.
    - ``multi_categorical`` (``MultiDiscrete(nvec)``): the components' logits side by side
      ``[..., sum(nvec)]``; action int64 ``[..., len(nvec)]``; the environment gets int32
      ``action + start``.
    - ``normal`` (a ``Box`` of shape ``[D]``): the mean ``[..., D]`` of a Gaussian with a
      state-independent log-std; action float32 ``[..., D]``, the sample; the environment gets it
      clipped to ``[low, high]`` (CleanRL's ``ppo_continuous_action.py``).
    - ``tanh_normal`` (a ``Box`` with finite bounds and ``--squash tanh``): the mean ``[..., D]`` of
      the Gaussian before the squash; action float32 ``[..., D]``, the pre-squash sample ``u``; the
      environment gets ``low + (tanh(u) + 1) * (high - low) / 2``, inside ``[low, high]``. Its
      log-prob is that of ``tanh(u)`` in ``(-1, 1)``, computed from the stored ``u`` (exact: no
      ``atanh`` of an action rounded to the bounds); the rescaling to the bounds adds a constant to
      it, which cancels in PPO's ratio.

    The categorical heads take a bool mask of the legal actions ``[..., n_out]`` (``maskable``).
    """

    kind: str
    n_out: int
    """the actor's outputs: n, sum(nvec) or D"""
    nvec: Optional[Tuple[int, ...]] = None
    start: Optional[Tuple[int, ...]] = None
    """the first action of each discrete component (gymnasium's ``start``), one per component"""
    low: Optional[Tuple[float, ...]] = None
    high: Optional[Tuple[float, ...]] = None
    bounds_dtype: Optional[str] = None
    """the Box's dtype: the Gaussian's sample is clipped to its bounds as they are stored"""

    @property
    def continuous(self) -> bool:
        """A Gaussian head (``normal`` or ``tanh_normal``): it has a log-std."""
        return self.kind in ("normal", "tanh_normal")

    @property
    def maskable(self) -> bool:
        """A categorical head: it takes a mask of the legal actions, bool ``[..., n_out]``."""
        return self.kind in ("categorical", "multi_categorical")

    @property
    def action_shape(self) -> Tuple[int, ...]:
        """One step's action: ``()``, ``(len(nvec),)`` or ``(D,)``."""
        return () if self.kind == "categorical" else (len(self.nvec),) if self.nvec else (self.n_out,)

    @property
    def action_dtype(self) -> torch.dtype:
        """The stored action's dtype: float32 for the Gaussian heads, int64 for the categorical ones."""
        return torch.float32 if self.continuous else torch.int64

    @property
    def env_dtype(self) -> np.dtype:
        """The environment's action dtype: float32 or int32."""
        return np.dtype(np.float32 if self.continuous else np.int32)

    def greedy(self, out: torch.Tensor, action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The deterministic action of the actor's output ``out`` ``[..., n_out]``, as it is stored:
        the most probable legal action (of each component), or the mean (before the squash)."""
        if self.continuous:
            return out
        if action_mask is not None:
            out = out.masked_fill(~action_mask, -math.inf)
        if self.kind == "categorical":
            return out.argmax(-1)
        return torch.stack([part.argmax(-1) for part in out.split(list(self.nvec), -1)], -1)

    def to_env(self, action: torch.Tensor) -> np.ndarray:
        """The environment's actions (numpy, :attr:`env_dtype`) of stored actions ``action``."""
        a = action.detach().cpu().numpy()
        if self.kind == "normal":
            return np.clip(a, np.asarray(self.low, self.bounds_dtype), np.asarray(self.high, self.bounds_dtype))
        if self.kind == "tanh_normal":
            low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
            scaled = (low + (np.tanh(a.astype(np.float64)) + 1.0) * (0.5 * (high - low))).astype(np.float32)
            return np.clip(scaled, low.astype(np.float32), high.astype(np.float32))  # rounding never leaves them
        a = a.astype(np.int32)
        if any(self.start):
            a += np.asarray(self.start if self.kind == "multi_categorical" else self.start[0], np.int32)
        return a


def action_head(action_space, squash: str = "none") -> ActionHead:
    """The :class:`ActionHead` of a single environment's ``action_space`` (gymnasium's or EnvPool's
    ``Discrete``, ``MultiDiscrete`` with a 1-D ``nvec``, or ``Box`` of shape ``[D]``; anything with
    their attributes): ``squash`` ``"tanh"`` squashes a Box's Gaussian into its bounds, which must
    then be finite; ``"none"`` keeps the Gaussian (clipped to the bounds when sent)."""
    if squash not in SQUASH:
        raise ValueError(f"--squash must be one of {', '.join(SQUASH)}, got {squash!r}")
    nvec = getattr(action_space, "nvec", None)
    shape = tuple(getattr(action_space, "shape", None) or ())
    if nvec is not None:
        nvec = np.asarray(nvec)
        if nvec.ndim != 1 or nvec.size == 0 or (nvec < 1).any():
            raise ValueError(f"a MultiDiscrete action space must have a 1-D nvec of sizes >= 1, got {action_space} "
                             f"(nvec of shape {nvec.shape})")
        start = np.broadcast_to(np.asarray(getattr(action_space, "start", 0)), nvec.shape)
        head = ActionHead("multi_categorical", int(nvec.sum()), tuple(int(n) for n in nvec),
                          tuple(int(s) for s in start))
    elif shape == () and hasattr(action_space, "n"):
        if int(action_space.n) < 1:
            raise ValueError(f"a Discrete action space needs n >= 1, got {action_space}")
        head = ActionHead("categorical", int(action_space.n), start=(int(getattr(action_space, "start", 0)),))
    elif len(shape) == 1 and hasattr(action_space, "low") and hasattr(action_space, "high"):
        low = np.broadcast_to(np.asarray(action_space.low, np.float64), shape)
        high = np.broadcast_to(np.asarray(action_space.high, np.float64), shape)
        kind = "tanh_normal" if squash == "tanh" else "normal"
        if kind == "tanh_normal" and not (np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all()):
            raise ValueError(f"--squash tanh squashes the actions into the Box's bounds, which must be finite with "
                             f"low < high; this task's action space is {action_space}")
        head = ActionHead(kind, shape[0], low=tuple(low.tolist()), high=tuple(high.tolist()),
                          bounds_dtype=np.dtype(getattr(action_space, "dtype", None) or np.float32).name)
    else:
        raise ValueError(f"fastppo train's policies take Discrete, MultiDiscrete (1-D nvec) and 1-D Box action "
                         f"spaces, got {action_space}")
    if squash == "tanh" and not head.continuous:
        raise ValueError(f"--squash tanh squashes a Gaussian into a bounded Box action space; this task's actions "
                         f"are {action_space} (use --squash none)")
    return head


def sample_and_score(kernels: "Kernels", out, log_std=None, action=None, head: Optional[ActionHead] = None,
                     action_mask=None):
    """The policy head on the actor's output ``out`` ``[..., n_out]`` (see :class:`ActionHead`):
    logits of a categorical or multi-categorical policy, or the mean of a Gaussian (tanh-squashed
    or not) with ``log_std`` ``[n_out]``. ``head`` None: categorical, or Gaussian when ``log_std``
    is given. ``action_mask``: None, or bool ``[..., n_out]``, the legal actions of a categorical
    head: only they are sampled, and the log-prob and entropy are those of the distribution over
    them. Samples ``action`` when None; returns ``(action, logprob, entropy)``."""
    kind = head.kind if head is not None else "normal" if log_std is not None else "categorical"
    if kind in ("normal", "tanh_normal"):
        if action is None:
            action = out + log_std.exp() * torch.randn_like(out)
        if kind == "normal":
            logprob, entropy = kernels.normal_logprob_entropy(out, log_std, action)
        else:  # the stored action is the pre-squash sample: the log-prob of tanh(u) is taken at u itself
            logprob, entropy = kernels.tanh_normal_logprob_entropy(out, log_std, torch.tanh(action), pre_tanh=action)
    elif kind == "multi_categorical":
        if action is None:
            return kernels.multi_categorical_sample(out, head.nvec, action_mask)
        logprob, entropy = kernels.multi_categorical_logprob_entropy(out, action.long(), head.nvec, action_mask)
    elif action_mask is not None:
        if action is None:
            return kernels.categorical_sample(out, mask=action_mask)
        logprob, entropy = kernels.categorical_logprob_entropy(out, action.long(), mask=action_mask)
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
    categorical_sample: Callable = fastppo.categorical_sample
    """the masked categorical head's sampler (the unmasked one samples with torch's Gumbel-max)"""
    multi_categorical_logprob_entropy: Callable = fastppo.multi_categorical_logprob_entropy
    multi_categorical_sample: Callable = fastppo.multi_categorical_sample
    tanh_normal_logprob_entropy: Callable = fastppo.tanh_normal_logprob_entropy
    fused_lstm: bool = True
    """a recurrent policy's LSTM on the CPU (float32/float64) as fastppo's C++ LSTM over time
    (:func:`fastppo.recurrent.lstm_sequence`: the rollout step and the update's sequence pass, the
    state reset at episode starts inside the call); off, torch's ``nn.LSTM`` over the segments"""
    channels_last: bool = True
    """the Atari CNN's weights in channels-last layout (oneDNN's fast convolutions: 1.3-1.5x on its
    forward and backward here); the eager baseline keeps CleanRL's default layout"""


# The MLP policy's activations by name (--activation).
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass(frozen=True)
class MlpShape:
    """The shape and initialization of the MLP policy (vector observations): ``hidden_sizes`` of the
    actor's and of the critic's own stacks, their ``activation`` (``"tanh"`` or ``"relu"``), the
    Gaussian head's initial ``log_std_init``, and ``ortho_init``: orthogonal weights of gain
    sqrt(2), 0.01 for the actor's output layer and 1 for the critic's, zero biases (CleanRL's and
    Stable-Baselines3's), else torch's default initialization of ``nn.Linear``. The defaults are
    CleanRL's ``Agent``."""

    hidden_sizes: Tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    log_std_init: float = 0.0
    ortho_init: bool = True

    def __post_init__(self):
        if not self.hidden_sizes or any(int(h) < 1 for h in self.hidden_sizes):
            raise ValueError(f"--hidden-sizes must be one or more sizes >= 1, got {list(self.hidden_sizes)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not math.isfinite(self.log_std_init):
            raise ValueError(f"--log-std-init must be finite, got {self.log_std_init}")

    @classmethod
    def of(cls, args) -> "MlpShape":
        """The shape ``fastppo train``'s settings give (settings saved before these options existed,
        or left unresolved: the defaults)."""
        values = {f: getattr(args, f, None) for f in ("hidden_sizes", "activation", "log_std_init", "ortho_init")}
        return cls(**{k: (tuple(v) if k == "hidden_sizes" else v) for k, v in values.items() if v is not None})

    def stack(self, n_in: int, n_out: int, out_gain: float) -> nn.Sequential:
        """``Linear``/activation layers from ``n_in`` through the hidden sizes to ``n_out``."""
        sizes = (n_in, *self.hidden_sizes)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [self._init(nn.Linear(a, b), math.sqrt(2)), ACTIVATIONS[self.activation]()]
        return nn.Sequential(*layers, self._init(nn.Linear(sizes[-1], n_out), out_gain))

    def _init(self, layer: nn.Linear, gain: float) -> nn.Linear:
        return layer_init(layer, std=gain) if self.ortho_init else layer


class Agent(nn.Module):
    """Actor-critic: MLPs for vector observations (shaped by ``mlp``, :class:`MlpShape`: CleanRL's
    64-64 tanh by default, one stack for the actor and one for the critic), the Nature CNN for Atari
    frames; the policy head follows the action space (:func:`action_head`: categorical,
    multi-categorical, or a Gaussian with a state-independent log-std, tanh-squashed into the
    bounds with ``squash="tanh"``)."""

    def __init__(self, obs_shape, action_space, family: str, kernels: Kernels = Kernels(), squash: str = "none",
                 mlp: MlpShape = MlpShape()):
        super().__init__()
        self.kernels = kernels
        self.head = action_head(action_space, squash)
        self.continuous = self.head.continuous
        n_out = self.head.n_out
        log_std_init = 0.0
        if family == "atari":
            self.trunk = nature_cnn(obs_shape[0])
            self.actor = layer_init(nn.Linear(512, n_out), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1)
            self.scale = 1.0 / 255.0
            if kernels.channels_last:
                self.trunk.to(memory_format=torch.channels_last)
        else:
            n_in = int(np.prod(obs_shape))
            self.trunk = nn.Identity()
            self.actor = mlp.stack(n_in, n_out, 0.01)
            self.critic = mlp.stack(n_in, 1, 1.0)
            self.scale = 1.0
            log_std_init = mlp.log_std_init
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.full((n_out,), float(log_std_init)))

    def features(self, obs):
        return self.trunk(obs.float() * self.scale) if self.scale != 1.0 else self.trunk(obs.float())

    def get_value(self, obs):
        return self.critic(self.features(obs)).squeeze(-1)

    def get_action_and_value(self, obs, action=None, action_mask=None):
        """``obs`` ``[B, *obs_shape]``; ``action`` None (sampled) or ``[B, *head.action_shape]``;
        ``action_mask`` None or bool ``[B, n_out]`` (a categorical head's legal actions). Returns
        ``(action, logprob, entropy, value)``."""
        h = self.features(obs)
        out = self.actor(h)
        action, logprob, entropy = sample_and_score(self.kernels, out, self.actor_logstd if self.continuous else None,
                                                    action, self.head, action_mask)
        return action, logprob, entropy, self.critic(h).squeeze(-1)
