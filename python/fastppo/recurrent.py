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

An LSTM on the CPU (float32 or float64) skips the segments: :func:`lstm_sequence` runs fastppo's
C++ LSTM over the ``[T, n]`` steps in one call each way, the state reset to zeros inside the time
loop before each episode start, the input projection of all steps one product before the loop and
the weight gradients one product each after the backward's loop. It serves the rollout step
(``T = 1``) as well; ``Kernels(fused_lstm=False)`` keeps torch's ``nn.LSTM``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from fastppo import _C
from fastppo import _buffers as B
from fastppo.agent import Agent, Kernels, MlpShape, action_head, nature_cnn, sample_and_score
from fastppo.policy import NotFusable, fused_mlp, lstm_parameters, mlp_forward, mlp_layers

__all__ = ["CELLS", "RecurrentAgent", "SegmentPlan", "lstm_sequence", "make_agent", "plan_segments", "run_segments"]

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
    at ``t = 0`` with no episode start); ``steps``, ``envs``: ``T`` and ``n``; ``starts``: the bool
    ``[T, n]`` the plan was made from (what :func:`lstm_sequence` reads instead of the segments)."""

    rows: Tensor
    valid: Tensor
    lengths: Tensor
    inverse: Tensor
    env: Tensor
    carry: Tensor
    steps: int
    envs: int
    starts: Optional[Tensor] = None

    def to(self, device) -> "SegmentPlan":
        """The plan with its index tensors on ``device`` (``lengths`` stays on the CPU, as torch wants)."""
        return self._replace(rows=self.rows.to(device), valid=self.valid.to(device), inverse=self.inverse.to(device),
                             env=self.env.to(device), carry=self.carry.to(device),
                             starts=None if self.starts is None else self.starts.to(device))


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
    return SegmentPlan(rows, valid, lengths, inverse, env, carry, T, n, starts)


# ------------------------------------------------------------------ the C++ LSTM over time


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, starts: Optional[Tensor], T: int, h0: Tensor, c0: Tensor, w_ih: Tensor,
                w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
        out, h_n, c_n, saved = _lstm_forward(x2d, starts, T, h0, c0, w_ih, w_hh, b_ih, b_hh, keep=True)
        ctx.T = T
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x2d, starts, w_ih, w_hh, saved)
        return out, h_n.clone(), c_n  # h_n: an output of its own, not a view of out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor]):
        x2d, starts, w_ih, w_hh, saved = ctx.saved_tensors
        T = ctx.T
        rows, F = x2d.shape
        n, H = rows // T, w_hh.shape[1]
        need = ctx.needs_input_grad

        def address(t: Optional[Tensor]) -> int:
            return 0 if t is None else t.data_ptr()

        def grad_in(g: Optional[Tensor]) -> Optional[Tensor]:
            return None if g is None else g.contiguous()

        def grad_buffer(flag: bool, like: Tensor) -> Optional[Tensor]:
            return torch.empty_like(like, memory_format=torch.contiguous_format) if flag else None

        grad_out, grad_h_n, grad_c_n = grad_in(grad_out), grad_in(grad_h_n), grad_in(grad_c_n)
        g_x = grad_buffer(need[0], x2d)
        g_h0 = torch.empty(n, H, dtype=x2d.dtype) if need[3] else None
        g_c0 = torch.empty(n, H, dtype=x2d.dtype) if need[4] else None
        g_w_ih, g_w_hh = grad_buffer(need[5], w_ih), grad_buffer(need[6], w_hh)
        g_b_ih = torch.empty(4 * H, dtype=x2d.dtype) if need[7] and ctx.has_bias[0] else None
        g_b_hh = torch.empty(4 * H, dtype=x2d.dtype) if need[8] and ctx.has_bias[1] else None
        _C.lstm_backward(B.DTYPE_NAMES[x2d.dtype], T, n, F, H, x2d.data_ptr(), x2d.stride(0), address(starts),
                         w_ih.data_ptr(), w_hh.data_ptr(), saved.data_ptr(), address(grad_out), address(grad_h_n),
                         address(grad_c_n), address(g_x), address(g_h0), address(g_c0), address(g_w_ih),
                         address(g_w_hh), address(g_b_ih), address(g_b_hh))
        return g_x, None, None, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih, g_b_hh


def _lstm_forward(x2d, starts, T, h0, c0, w_ih, w_hh, b_ih, b_hh, keep: bool, out=None, c_n=None):
    """The C++ forward, no checks: ``out`` ``[T * n, H]``, ``h_n`` (its last step), ``c_n`` ``[n, H]``
    (``out`` and ``c_n`` written into the contiguous tensors given, else new ones) and, with
    ``keep``, what the backward reads."""
    rows, F = x2d.shape
    n, H = h0.shape
    dtype = x2d.dtype
    out = torch.empty(rows, H, dtype=dtype) if out is None else out
    c_n = torch.empty(n, H, dtype=dtype) if c_n is None else c_n
    saved = torch.empty(_C.lstm_saved_size(rows, H), dtype=dtype) if keep else None
    _C.lstm_forward(B.DTYPE_NAMES[dtype], T, n, F, H, x2d.data_ptr(), x2d.stride(0),
                    0 if starts is None else starts.data_ptr(), h0.data_ptr(), c0.data_ptr(), w_ih.data_ptr(),
                    w_hh.data_ptr(), 0 if b_ih is None else b_ih.data_ptr(), 0 if b_hh is None else b_hh.data_ptr(),
                    out.data_ptr(), 0, c_n.data_ptr(), 0 if saved is None else saved.data_ptr())
    return out, out[rows - n:], c_n, saved


def lstm_sequence(rnn: nn.LSTM, x: Tensor, starts: Optional[Tensor] = None,
                  state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``rnn`` over the ``T`` time-major steps of ``n`` sequences in one C++ call (and one for the
    backward), the state reset to zeros before each step where ``starts`` is set: equal to stepping
    ``rnn`` one step at a time with ``h, c = 0`` wherever ``starts[t, e]`` (to rounding: the gates'
    sigmoid and tanh come from a vectorized exp).

    Args:
        rnn: a one-layer, unidirectional ``nn.LSTM`` without projections (``batch_first`` is not
            read: ``x`` is time-major), CPU parameters, float32 or float64.
        x: ``[T, n, F]``, the parameters' dtype, CPU.
        starts: bool ``[T, n]`` (reset the state before step ``t`` of sequence ``e``), or None.
        state: ``(h0, c0)``, each ``[n, H]`` (the state before step 0), or None for zeros.

    Returns ``(out, (h_n, c_n))``: ``out`` ``[T, n, H]`` (``h`` after each step), ``h_n`` and
    ``c_n`` ``[n, H]`` (after the last step); differentiable with respect to ``x``, ``state`` and
    ``rnn``'s parameters when grad is enabled.
    """
    fn = "lstm_sequence"
    try:
        w_ih, w_hh, b_ih, b_hh = lstm_parameters(rnn)
    except NotFusable as err:
        raise ValueError(f"{fn}: rnn: {err}") from None
    if w_ih.dtype not in (torch.float32, torch.float64) or not w_ih.is_cpu:
        raise ValueError(f"{fn}: rnn's parameters must be float32 or float64 on the CPU, got {w_ih.dtype} on "
                         f"{w_ih.device}")
    params = [p for p in (w_ih, w_hh, b_ih, b_hh) if p is not None]
    if any(p.dtype != w_ih.dtype or not p.is_contiguous() for p in params):
        raise ValueError(f"{fn}: rnn's parameters must all be contiguous and of one dtype")
    B.require_array(fn, "x", x, "torch", (B.DTYPE_NAMES[w_ih.dtype],))
    H, F = rnn.hidden_size, rnn.input_size
    if not x.is_cpu or x.dim() != 3 or x.shape[2] != F or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{fn}: x must be a CPU tensor of shape [T, n, {F}] with T, n >= 1, got shape "
                         f"{list(x.shape)} on {x.device}")
    T, n = x.shape[:2]
    if starts is not None:
        B.require_array(fn, "starts", starts, "torch", ("bool",))
        if tuple(starts.shape) != (T, n) or not starts.is_cpu:
            raise ValueError(f"{fn}: starts must be a CPU bool tensor of shape [T, n] = [{T}, {n}], got shape "
                             f"{list(starts.shape)} on {starts.device}")
        starts = starts.contiguous().view(torch.uint8)
    if state is None:
        h0 = c0 = torch.zeros(n, H, dtype=x.dtype)
    else:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"{fn}: state must be None or a pair (h0, c0), got {type(state).__name__}")
        for name, s in zip(("h0", "c0"), state):
            B.require_array(fn, name, s, "torch", (B.DTYPE_NAMES[x.dtype],))
            if tuple(s.shape) != (n, H) or not s.is_cpu:
                raise ValueError(f"{fn}: {name} must be a CPU tensor of shape [n, H] = [{n}, {H}], got shape "
                                 f"{list(s.shape)} on {s.device}")
        h0, c0 = (s.contiguous() for s in state)
    x2d = x.reshape(T * n, F)
    if x2d.stride(1) != 1 or x2d.stride(0) < F:
        x2d = x2d.contiguous()
    tensors = (x2d, h0, c0, *params)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, h_n, c_n = _LSTMSequence.apply(x2d, starts, T, h0, c0, w_ih, w_hh, b_ih, b_hh)
    else:
        out, h_n, c_n, _ = _lstm_forward(x2d, starts, T, h0, c0, w_ih, w_hh, b_ih, b_hh, keep=False)
        h_n = h_n.clone()
    return out.view(T, n, H), (h_n, c_n)


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

    def _inference_step(self, x: Tensor, state: Tensor, start: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`step` without autograd (the rollout's): the C++ LSTM and MLP forwards called
        directly, none of the per-call checks of :func:`lstm_sequence` and ``fused_mlp`` (their
        inputs are this module's own). ``x`` ``[n, F]``."""
        if "_inference_layers" not in self.__dict__:  # the module's structure is fixed: read it once
            self._inference_layers = ([lstm_parameters(rnn) for rnn in self.rnns], mlp_layers(self.actor),
                                      mlp_layers(self.critic))
        rnns, (actor, act), (critic, _) = self._inference_layers
        n, H = x.shape[0], self.hidden_size
        x, state, starts = x.contiguous(), state.contiguous(), start.contiguous().view(torch.uint8)
        new = torch.empty(self.state_size, n, H, dtype=x.dtype)
        for i, params in enumerate(rnns):  # T = 1: h after the step is the output
            _lstm_forward(x, starts, 1, state[2 * i], state[2 * i + 1], *params, keep=False, out=new[2 * i],
                          c_n=new[2 * i + 1])
        logits = mlp_forward(actor, act, True, new[0])[1]
        value = mlp_forward(critic, act, True, new[2 * (len(rnns) - 1)])[1]
        return logits, value[:, 0], new

    def _fused(self, x: Tensor) -> bool:
        """Whether the RNNs run as :func:`lstm_sequence` on ``x``: an LSTM on the CPU in float32 or
        float64, unless ``Kernels(fused_lstm=False)``."""
        return (self.kernels.fused_lstm and self.cell == "lstm" and x.is_cpu
                and x.dtype in (torch.float32, torch.float64))

    def _state_of(self, state: Tensor, i: int):
        """The initial state of RNN ``i`` from ``state`` ``[K, n, H]``: ``[n, H]`` or (h, c)."""
        s = state[i * self.slots:(i + 1) * self.slots]
        return (s[0], s[1]) if self.slots == 2 else s[0]

    def step(self, obs: Tensor, state: Tensor, start: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One step of ``n`` environments: ``obs`` ``[n, *obs_shape]``, ``state`` ``[K, n, H]`` (after
        their previous step), ``start`` bool ``[n]`` (the observation starts an episode: the state
        is reset first). Returns the actor's output ``[n, A]``, the value ``[n]`` and the new state."""
        x = self.features(obs)[None]
        outs, new = [], []
        if self._fused(x) and not torch.is_grad_enabled():
            return self._inference_step(x[0], state, start)
        if self._fused(x):
            for i, rnn in enumerate(self.rnns):
                out, (h, c) = lstm_sequence(rnn, x, start[None], self._state_of(state, i))
                outs.append(out[0])
                new.extend((h, c))
            return fused_mlp(self.actor, outs[0]), fused_mlp(self.critic, outs[-1]).squeeze(-1), torch.stack(new)
        state = state.masked_fill(start[None, :, None], 0.0)
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
        fused = self._fused(x) and plan.starts is not None and padded is None
        if fused:
            outs = [lstm_sequence(rnn, x, plan.starts, self._state_of(state, i))[0] for i, rnn in enumerate(self.rnns)]
        else:
            outs = [run_segments(rnn, x, plan, self._state_of(state, i), padded) for i, rnn in enumerate(self.rnns)]
        mlp = fused_mlp if fused else (lambda seq, h: seq(h))
        out = mlp(self.actor, outs[0])
        _, logprob, entropy = sample_and_score(self.kernels, out, self.actor_logstd if self.continuous else None,
                                               actions, self.head, action_mask)
        return logprob, entropy, mlp(self.critic, outs[-1]).squeeze(-1)


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
