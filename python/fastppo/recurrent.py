"""Recurrent policies of ``fastppo train --recurrent lstm|gru``: the actor-critic, and the sequence
pass of the update as one call of torch's RNN per minibatch.

A rollout is ``T`` steps of ``N`` environments. Each environment's steps form one sequence, which
the hidden state follows through the rollout: the state is reset to zeros before a step whose
observation starts an episode (``starts[t, e]``), and the rollout's first step of each environment
continues from the state stored when the rollout began. With EnvPool's next-step auto-reset the
step after an episode's last one is a dummy step from the final observation (masked out of the
loss): it still belongs to the ended episode, and the step after it starts the new one.

In the update a minibatch is a set of whole environments (their ``T`` steps). Each environment's
sequence is cut at its episode starts into segments, and the segments run through the RNN in one
call: sorted by length, each with its initial state (the stored one for a segment that starts at
``t = 0`` without an episode start, zeros for the others), either as a ``PackedSequence``
(``torch.nn.utils.rnn.pack_padded_sequence``) or, for an LSTM on the CPU when the padding costs
little, as the padded ``[L, S, F]`` batch, which torch hands to oneDNN's fused LSTM (a
unidirectional RNN's output at a step depends only on the steps before it, so the padding after
a segment's end changes nothing that is kept). The outputs are put back in the ``[T, n]`` order
of the rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from fastppo.agent import Agent, Kernels, MlpShape, action_head, nature_cnn, sample_and_score

__all__ = ["CELLS", "RecurrentAgent", "SegmentPlan", "make_agent", "plan_segments", "run_segments"]

# The --recurrent choices and their torch modules.
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
# An LSTM on the CPU runs the padded batch when it holds at most this many times the minibatch's rows:
# torch hands an unpacked float32 LSTM to oneDNN's fused RNN, whose forward and backward took 1/5 and
# 1/2 of the packed pass's time here at the sizes of rl-baselines3-zoo's CartPoleNoVel setting (T 32,
# 8 envs, 64 units), with padding of 1.4x and 4.8x the rows. A GRU (no oneDNN kernel), CUDA (cuDNN
# runs packed sequences) and float64 run packed.
PADDED_WORK_LIMIT = 8


class SegmentPlan(NamedTuple):
    """How the ``[T, n]`` steps of ``n`` environments are cut into ``S`` segments at episode starts,
    sorted by length (longest first, ties in environment then time order).

    ``rows``: int64 ``[L, S]``, the row ``t * n + e`` of the ``j``-th step of each segment (0 past
    its end; ``L`` is the longest length); ``valid``: bool ``[L, S]``, ``j`` within the segment;
    ``lengths``: int64 ``[S]`` on the CPU; ``inverse``: int64 ``[T * n]``, the place of each row in
    the order ``rows[valid]`` (step ``j`` of every segment that has one, ``j = 0, 1, ...``: the order
    of a ``PackedSequence``'s data); ``env``: int64 ``[S]``, each segment's environment; ``carry``:
    bool ``[S]``, whether the segment continues the state stored at the rollout's start (it starts
    at ``t = 0`` with no episode start); ``steps``, ``envs``: ``T`` and ``n``."""

    rows: Tensor
    valid: Tensor
    lengths: Tensor
    inverse: Tensor
    env: Tensor
    carry: Tensor
    steps: int
    envs: int

    def to(self, device) -> "SegmentPlan":
        """The plan with its index tensors on ``device`` (``lengths`` stays on the CPU, as torch wants)."""
        return self._replace(rows=self.rows.to(device), valid=self.valid.to(device), inverse=self.inverse.to(device),
                             env=self.env.to(device), carry=self.carry.to(device))


def plan_segments(starts) -> SegmentPlan:
    """The segments of ``starts`` (bool ``[T, n]``, numpy or torch: ``starts[t, e]`` says that step
    ``t`` of environment ``e`` starts an episode, so the state is reset before it). Computed on the
    CPU; move it with :meth:`SegmentPlan.to`."""
    starts = torch.as_tensor(starts.cpu() if isinstance(starts, Tensor) else np.asarray(starts))
    if starts.dim() != 2 or starts.dtype != torch.bool or starts.numel() == 0:
        raise ValueError(f"plan_segments: starts must be a non-empty bool [T, n] array, got dtype {starts.dtype} "
                         f"and shape {tuple(starts.shape)}")
    T, n = starts.shape
    cut = starts.clone()
    cut[0] = True  # every environment's sequence begins a segment
    first = torch.nonzero(cut.t().reshape(-1)).squeeze(1)  # e * T + t of each segment's first step
    lengths = torch.diff(first, append=torch.tensor([T * n]))
    order = torch.argsort(lengths, descending=True, stable=True)
    first, lengths = first[order], lengths[order]
    env, t0 = first // T, first % T
    j = torch.arange(int(lengths[0]))[:, None]
    valid = j < lengths[None, :]
    rows = torch.where(valid, (t0[None, :] + j) * n + env[None, :], 0)
    inverse = torch.empty(T * n, dtype=torch.int64)
    inverse[rows[valid]] = torch.arange(T * n)
    carry = (t0 == 0) & ~starts[0, env]
    return SegmentPlan(rows, valid, lengths, inverse, env, carry, T, n)


def run_segments(rnn: nn.Module, x: Tensor, plan: SegmentPlan, state, padded: Optional[bool] = None) -> Tensor:
    """One call of ``rnn`` (a one-layer ``nn.LSTM`` or ``nn.GRU``, not batch-first) over the
    segments of ``plan``: ``x`` ``[T, n, F]``, ``state`` the state stored at the rollout's start,
    ``[n, H]`` (GRU) or a pair of them (LSTM: ``h``, ``c``); returns the outputs ``[T, n, H]``, equal
    to stepping ``rnn`` through each environment's steps from ``state`` with the state reset to
    zeros before each episode start. ``padded``: run the padded batch (True) or a
    ``PackedSequence`` (False); None picks the padded batch for a float32 LSTM on the CPU when
    it holds at most ``PADDED_WORK_LIMIT`` times the rows (oneDNN's fused LSTM), else packed."""
    T, n = plan.steps, plan.envs
    if x.dim() != 3 or x.shape[:2] != (T, n):
        raise ValueError(f"run_segments: x has shape {tuple(x.shape)}; expected [T, n, F] = [{T}, {n}, F] (the plan's)")
    flat = x.reshape(T * n, x.shape[-1])
    L, S = plan.rows.shape
    if padded is None:
        padded = (flat.device.type == "cpu" and flat.dtype == torch.float32 and isinstance(rnn, nn.LSTM)
                  and L * S <= PADDED_WORK_LIMIT * T * n)
    xs = flat[plan.rows].masked_fill(~plan.valid[..., None], 0.0)  # [L, S, F], zeros past each segment's end
    keep = plan.carry[:, None]

    def initial(h: Tensor) -> Tensor:
        return torch.where(keep, h[plan.env], 0.0)[None]

    h0 = tuple(initial(h) for h in state) if isinstance(state, (tuple, list)) else initial(state)
    if padded:
        out, _ = rnn(xs, h0)
        out = out[plan.valid]  # the packed order: step j of each segment that has one, j = 0, 1, ...
    else:
        out = rnn(pack_padded_sequence(xs, plan.lengths, enforce_sorted=True), h0)[0].data
    return out[plan.inverse].view(T, n, rnn.hidden_size)


class RecurrentAgent(nn.Module):
    """Actor-critic with an RNN over time, shaped like sb3-contrib's ``MlpLstmPolicy``: the
    observation (vector observations as they are, Atari frames through the Nature CNN) goes into a
    one-layer LSTM or GRU of ``hidden_size`` units, one for the actor and one for the critic
    (sb3-contrib's ``enable_critic_lstm``), or one read by both with ``shared`` (CleanRL's
    ``ppo_atari_lstm.py``; both losses train it); each RNN's output goes through
    ``Linear(hidden_size, 64)``, ReLU and the output layer (the categorical logits or the Gaussian
    mean with a state-independent ``actor_logstd``; the value). torch's default initialization (the
    settings of rl-baselines3-zoo's ``ppo_lstm.yml``: ``ortho_init=False``, ``activation_fn=ReLU``,
    ``net_arch=dict(pi=[64], vf=[64])``). The policy head follows the action space as
    :class:`fastppo.agent.Agent`'s does (``head``, ``squash``).

    The recurrent state of ``n`` environments is one tensor ``[K, n, hidden_size]``: ``h`` (and
    ``c`` for an LSTM) of the actor's RNN, then of the critic's (``K`` is 1, 2 or 4)."""

    recurrent = True

    def __init__(self, obs_shape, action_space, family: str, cell: str = "lstm", hidden_size: int = 64,
                 shared: bool = False, kernels: Kernels = Kernels(), squash: str = "none"):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"RecurrentAgent: cell must be one of {', '.join(CELLS)}, got {cell!r}")
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"RecurrentAgent: hidden_size must be an integer >= 1, got {hidden_size!r}")
        self.kernels, self.cell, self.hidden_size, self.shared = kernels, cell, hidden_size, shared
        self.head = action_head(action_space, squash)
        self.continuous = self.head.continuous
        n_out = self.head.n_out
        if family == "atari":
            self.trunk, n_in, self.scale = nature_cnn(obs_shape[0]), 512, 1.0 / 255.0
        else:
            self.trunk, n_in, self.scale = nn.Flatten(), int(np.prod(obs_shape)), 1.0
        rnn = CELLS[cell]
        self.actor_rnn = rnn(n_in, hidden_size)
        self.critic_rnn = None if shared else rnn(n_in, hidden_size)
        self.actor = nn.Sequential(nn.Linear(hidden_size, 64), nn.ReLU(), nn.Linear(64, n_out))
        self.critic = nn.Sequential(nn.Linear(hidden_size, 64), nn.ReLU(), nn.Linear(64, 1))
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(n_out))
        self.slots = 2 if cell == "lstm" else 1  # state tensors per RNN

    @property
    def rnns(self) -> Tuple[nn.Module, ...]:
        return (self.actor_rnn,) if self.critic_rnn is None else (self.actor_rnn, self.critic_rnn)

    @property
    def state_size(self) -> int:
        """``K``: the state tensors of all RNNs."""
        return self.slots * len(self.rnns)

    def initial_state(self, n: int, device=None) -> Tensor:
        """Zeros ``[K, n, hidden_size]`` (the state before an episode's first step)."""
        weight = self.actor[0].weight
        return torch.zeros(self.state_size, n, self.hidden_size, dtype=weight.dtype,
                           device=weight.device if device is None else device)

    def features(self, obs: Tensor) -> Tensor:
        """``[B, *obs_shape]`` -> ``[B, F]`` in the parameters' dtype."""
        x = obs.to(self.actor[0].weight.dtype)
        return self.trunk(x * self.scale if self.scale != 1.0 else x)

    def _state_of(self, state: Tensor, i: int):
        """The initial state of RNN ``i`` from ``state`` ``[K, n, H]``: ``[n, H]`` or (h, c)."""
        s = state[i * self.slots:(i + 1) * self.slots]
        return (s[0], s[1]) if self.slots == 2 else s[0]

    def step(self, obs: Tensor, state: Tensor, start: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One step of ``n`` environments: ``obs`` ``[n, *obs_shape]``, ``state`` ``[K, n, H]`` (after
        their previous step), ``start`` bool ``[n]`` (the observation starts an episode: the state
        is reset first). Returns the actor's output ``[n, A]``, the value ``[n]`` and the new state."""
        x = self.features(obs)[None]
        state = state.masked_fill(start[None, :, None], 0.0)
        outs, new = [], []
        for i, rnn in enumerate(self.rnns):
            h = self._state_of(state, i)
            out, h = rnn(x, tuple(s[None] for s in h) if self.slots == 2 else h[None])
            outs.append(out[0])
            new.extend(h if self.slots == 2 else (h,))
        return self.actor(outs[0]), self.critic(outs[-1]).squeeze(-1), torch.cat(new)

    def get_action_and_value(self, obs: Tensor, state: Tensor, start: Tensor, action: Optional[Tensor] = None,
                             action_mask: Optional[Tensor] = None):
        """:meth:`step` with the policy head: ``(action, logprob, entropy, value, new_state)``; the
        action is sampled when None; ``action_mask``: None or bool ``[n, n_out]``, the legal actions
        of a categorical head."""
        out, value, state = self.step(obs, state, start)
        action, logprob, entropy = sample_and_score(self.kernels, out, self.actor_logstd if self.continuous else None,
                                                    action, self.head, action_mask)
        return action, logprob, entropy, value, state

    def get_value(self, obs: Tensor, state: Tensor, start: Tensor) -> Tensor:
        """The value ``[n]`` of ``obs`` after ``state`` (reset where ``start``)."""
        return self.step(obs, state, start)[1]

    def evaluate_sequences(self, obs: Tensor, actions: Tensor, plan: SegmentPlan, state: Tensor,
                           padded: Optional[bool] = None,
                           action_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The update's pass over ``n`` environments' whole rollouts: ``obs`` ``[T, n, *obs_shape]``,
        ``actions`` ``[T, n]`` or ``[T, n, D]``, ``plan`` their :func:`plan_segments` (on ``obs``'s
        device), ``state`` ``[K, n, H]`` the state stored at the rollout's start, ``action_mask``
        None or bool ``[T, n, n_out]`` (the legal actions of each step). One call of each RNN
        (:func:`run_segments`). Returns ``(logprob, entropy, value)``, each ``[T, n]``."""
        T, n = plan.steps, plan.envs
        x = self.features(obs.reshape((T * n,) + obs.shape[2:])).view(T, n, -1)
        outs = [run_segments(rnn, x, plan, self._state_of(state, i), padded) for i, rnn in enumerate(self.rnns)]
        out = self.actor(outs[0])
        _, logprob, entropy = sample_and_score(self.kernels, out, self.actor_logstd if self.continuous else None,
                                               actions, self.head, action_mask)
        return logprob, entropy, self.critic(outs[-1]).squeeze(-1)


def make_agent(args, obs_shape, action_space, family: str, kernels: Kernels = Kernels()) -> nn.Module:
    """The actor-critic of ``fastppo train``'s ``args``: a :class:`RecurrentAgent` with ``--recurrent
    lstm|gru`` (its ``--recurrent-hidden-size`` and ``--recurrent-shared``), else the feed-forward
    :class:`fastppo.agent.Agent` (shaped by ``--hidden-sizes``, ``--activation``, ``--log-std-init``,
    ``--ortho-init``); the head of ``action_space`` (with ``--squash``)."""
    cell = getattr(args, "recurrent", None)
    squash = getattr(args, "squash", None) or "none"
    if cell in (None, "none"):
        return Agent(obs_shape, action_space, family, kernels, squash, MlpShape.of(args))
    return RecurrentAgent(obs_shape, action_space, family, cell, args.recurrent_hidden_size, args.recurrent_shared,
                          kernels, squash)
