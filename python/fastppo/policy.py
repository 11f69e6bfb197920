"""The fused actor-critic: PPO's small MLP policies as a few big C++ calls on the CPU.

For the policies PPO mostly trains (two 64-64 tanh MLPs on a few observations) the arithmetic
of a rollout step is a microsecond or two, while PyTorch's eager dispatch of its ~15 ops costs
tens of microseconds and a minibatch update (forward, heads, loss, backward, grad clip, Adam)
about a millisecond. Here each of those is one call into ``fastppo._C`` that reads the torch
parameters in place:

- :func:`fused_mlp`: a differentiable ``nn.Sequential`` of ``Linear`` and ``Tanh``/``ReLU``
  layers (forward and backward fused), usable in any training loop;
- :class:`FusedActorCritic`: an actor-critic module (``actor``, ``critic``, optional shared
  ``trunk``, ``actor_logstd`` for a Gaussian policy) run as one call per rollout step
  (:meth:`~FusedActorCritic.act`: action sampling, log-prob and value) and one call per minibatch
  (:meth:`~FusedActorCritic.update`: ``fastppo.ppo_loss``'s clipped loss, backward into the
  parameters' gradients, ``clip_grad_norm_`` and Adam as ``torch.optim.Adam`` computes them). Its
  heads: categorical and multi-discrete (both optionally under masks of legal actions), diagonal
  Gaussian and tanh-squashed Gaussian.

The parameters are moved into one flat buffer (each ``nn.Parameter`` becomes a view of it), so the
module's ``state_dict``, ``load_state_dict`` and ordinary torch forward passes keep working. Build
the fused object after moving the module to its device and dtype; CPU float32 and float64 only.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import _C
from . import _buffers as B

__all__ = ["FusedActorCritic", "NotFusable", "fused_mlp", "mlp_layers"]

_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}
# What update() takes as minibatch rows (int64 C-contiguous is read in place, the others copied once)
# and what set_batch() takes as a categorical head's actions (float: CleanRL's action storage).
_INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
_CATEGORICAL_ACTION_DTYPES = _INDEX_DTYPES + ("float32", "float64", "float16", "bfloat16")


class NotFusable(ValueError):
    """The module is not a stack the fused code runs (it still runs on the torch path)."""


def mlp_layers(seq: nn.Module, *, last_linear: bool = True) -> Tuple[List[nn.Linear], Optional[str]]:
    """The ``Linear`` layers of ``seq`` and its activation name: ``seq`` must alternate ``Linear``
    and one activation type (``Tanh`` or ``ReLU``), ending with a ``Linear`` when ``last_linear``
    and with the activation otherwise. A lone ``Linear`` is a one-layer stack. Raises
    :class:`NotFusable` naming what does not fit."""
    modules = [seq] if isinstance(seq, nn.Linear) else list(seq.children()) if isinstance(seq, nn.Sequential) else None
    if not modules:
        raise NotFusable(f"expected an nn.Sequential of Linear and Tanh/ReLU layers or an nn.Linear, got {type(seq).__name__}")
    linears, activation = [], None
    for i, module in enumerate(modules):
        expect_linear = i % 2 == 0
        if expect_linear:
            if not isinstance(module, nn.Linear) or module.bias is None:
                raise NotFusable(f"layer {i} must be an nn.Linear with a bias, got {module!r}")
            linears.append(module)
        else:
            name = _ACTIVATIONS.get(type(module))
            if name is None:
                raise NotFusable(f"layer {i} must be nn.Tanh or nn.ReLU, got {module!r}")
            if activation not in (None, name):
                raise NotFusable(f"every activation must be the same; layer {i} is {name}, earlier ones {activation}")
            activation = name
    ends_linear = len(modules) % 2 == 1
    if ends_linear != last_linear:
        raise NotFusable(f"the stack must end with {'a Linear' if last_linear else 'an activation'}, got {modules[-1]!r}")
    if len(linears) > 16:
        raise NotFusable(f"at most 16 Linear layers, got {len(linears)}")
    for a, b in zip(linears, linears[1:]):
        if b.in_features != a.out_features:
            raise NotFusable(f"a Linear with {b.in_features} inputs follows one with {a.out_features} outputs")
    return linears, activation


def _layer_specs(linears: Sequence[nn.Linear], grads: bool) -> list:
    specs = []
    for layer in linears:
        w, b = layer.weight, layer.bias
        gw = w.grad.data_ptr() if grads and w.grad is not None else 0
        gb = b.grad.data_ptr() if grads and b.grad is not None else 0
        specs.append((w.data_ptr(), b.data_ptr(), gw, gb, layer.in_features, layer.out_features))
    return specs


def _check_params(linears: Sequence[nn.Linear], where: str) -> torch.dtype:
    dtype = linears[0].weight.dtype
    for layer in linears:
        for name, p in (("weight", layer.weight), ("bias", layer.bias)):
            if not p.is_cpu:
                raise NotFusable(f"{where}: the fused MLP runs on the CPU; a {name} is on {p.device}")
            if p.dtype != dtype or B.DTYPE_NAMES[dtype] not in B.FLOAT_DTYPES:
                raise NotFusable(f"{where}: parameters must all be float32 or all float64, got {p.dtype}")
            if not p.is_contiguous():
                raise NotFusable(f"{where}: a {name} is not contiguous")
    return dtype


# ------------------------------------------------------------------ fused_mlp (autograd)


def mlp_forward(linears: Sequence[nn.Linear], activation: Optional[str], last_linear: bool,
                x2d: Tensor) -> Tuple[Tensor, Tensor]:
    """One C++ forward of the stack over ``x2d`` ``[rows, in]`` (unit columns), no checks: every
    layer's output in ``saved`` (what the backward reads) and the last one's ``[rows, out]``, a view
    into it."""
    rows = x2d.shape[0]
    saved = torch.empty(sum(rows * l.out_features for l in linears), dtype=x2d.dtype)
    _C.mlp_forward(B.DTYPE_NAMES[x2d.dtype], _layer_specs(linears, False), activation or "tanh", last_linear, rows,
                   x2d.data_ptr(), x2d.stride(0), saved.data_ptr())
    out_features = linears[-1].out_features
    return saved, saved[saved.numel() - rows * out_features:].view(rows, out_features)


def lstm_parameters(rnn: nn.Module) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(weight_ih, weight_hh, bias_ih, bias_hh)`` of a one-layer, unidirectional ``nn.LSTM``
    without projections (biases None without ``bias``); :class:`NotFusable` for any other module."""
    if not isinstance(rnn, nn.LSTM) or rnn.num_layers != 1 or rnn.bidirectional or rnn.proj_size:
        raise NotFusable(f"expected a one-layer unidirectional nn.LSTM without proj_size, got {rnn!r}")
    biases = (rnn.bias_ih_l0, rnn.bias_hh_l0) if rnn.bias else (None, None)
    return (rnn.weight_ih_l0, rnn.weight_hh_l0, *biases)


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, linears, activation: str, last_linear: bool, *params: Tensor) -> Tensor:
        saved, out = mlp_forward(linears, activation, last_linear, x2d)
        ctx.linears, ctx.activation, ctx.last_linear = linears, activation, last_linear
        ctx.save_for_backward(x2d, saved, *params)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2d, saved, *params = ctx.saved_tensors
        linears = ctx.linears
        rows = x2d.shape[0]
        grad_out = grad_out.contiguous()
        grads = [torch.empty_like(p) for p in params]
        grad_x = torch.empty_like(x2d) if ctx.needs_input_grad[0] else None
        specs = [(l.weight.data_ptr(), l.bias.data_ptr(), grads[2 * i].data_ptr(), grads[2 * i + 1].data_ptr(),
                  l.in_features, l.out_features) for i, l in enumerate(linears)]
        _C.mlp_backward(B.DTYPE_NAMES[x2d.dtype], specs, ctx.activation or "tanh", ctx.last_linear, rows,
                        x2d.data_ptr(), x2d.stride(0), saved.data_ptr(), grad_out.data_ptr(),
                        0 if grad_x is None else grad_x.data_ptr())
        return (grad_x, None, None, None, *grads)


def fused_mlp(seq: nn.Module, x: Tensor, *, last_linear: bool = True) -> Tensor:
    """``seq(x)`` for an ``nn.Sequential`` of ``Linear`` and ``Tanh``/``ReLU`` layers as one fused
    forward (and one fused backward) on the CPU.

    Args:
        seq: ``Linear, act, Linear, act, ..., Linear`` (``last_linear=False``: ending with ``act``);
            CPU parameters, all float32 or all float64.
        x: ``[..., in_features]``, the parameters' dtype, CPU.

    Returns ``[..., out_features]``, differentiable w.r.t. ``x`` and every parameter of ``seq``;
    equal to ``seq(x)`` to rounding (tanh is computed from a vectorized exp).
    """
    linears, activation = mlp_layers(seq, last_linear=last_linear)
    dtype = _check_params(linears, "fused_mlp")
    B.require_array("fused_mlp", "x", x, "torch", (B.DTYPE_NAMES[dtype],))
    if not x.is_cpu:
        raise ValueError(f"fused_mlp: x must be on the CPU, got {x.device}")
    if x.dim() < 1 or x.shape[-1] != linears[0].in_features:
        raise ValueError(f"fused_mlp: x must have shape [..., {linears[0].in_features}], got {list(x.shape)}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(1) != 1 or x2d.stride(0) < x2d.shape[1] or x2d.shape[0] == 0:  # rows must not overlap
        x2d = torch.empty(x2d.shape, dtype=x2d.dtype).copy_(x2d)
    params = [p for l in linears for p in (l.weight, l.bias)]
    out = _FusedMLP.apply(x2d, linears, activation, last_linear, *params)
    return out.reshape(*lead, linears[-1].out_features)


# ------------------------------------------------------------------ the actor-critic


class FusedActorCritic:
    """One C++ call per rollout step and one per minibatch update for an actor-critic module.

    ``module`` must have ``actor`` or ``actor_mean`` (``Linear``/activation stack ending in a
    ``Linear``: logits ``[A]`` or Gaussian means ``[D]``), ``critic`` (the same, ending in one
    output) and may have ``trunk`` (a stack ending in its activation, shared by both;
    ``nn.Identity`` or absent: none) and ``actor_logstd`` (``[D]`` or ``[1, D]``, a
    state-independent Gaussian policy; else categorical). CleanRL's ``Agent`` of ``ppo.py`` and
    ``ppo_continuous_action.py`` and ``fastppo.train.Agent`` for classic control and MuJoCo have
    this shape. Anything else raises :class:`NotFusable` (train it on the torch path).

    The policy head (:attr:`kind`), from ``module.head`` where the module has one
    (``fastppo.agent.Agent``'s :class:`~fastppo.agent.ActionHead`), else from ``nvec`` and ``squash``:

    - ``categorical``: logits ``[A]``; actions int64 ``[rows]``; environment actions int32 ``[rows]``.
    - ``multi_categorical`` (``nvec``, the sizes of ``K`` components, summing to ``A``): the
      components' logits side by side ``[sum(nvec)]``; actions int64 ``[rows, K]`` (each component's
      index from 0); environment actions int32 ``[rows, K]``; log-prob and entropy summed over the
      components, as ``fastppo.multi_categorical_logprob_entropy``.
    - ``normal``: means ``[D]``; actions ``[rows, D]`` in the parameters' dtype, the sample;
      environment actions float32, the sample clipped to the bounds of :meth:`set_action_bounds`.
    - ``tanh_normal`` (``squash="tanh"``): means ``[D]`` of the Gaussian before the squash;
      actions ``[rows, D]``, the pre-squash sample ``u``; environment actions float32 ``low +
      (tanh(u) + 1) * (high - low) / 2``; log-prob and entropy as
      ``fastppo.tanh_normal_logprob_entropy(mean, log_std, tanh(u), pre_tanh=u)``.

    The two discrete heads take masks of legal actions, bool ``[rows, A]`` (flat over a
    multi-discrete head's components, as sb3-contrib's ``action_masks()``): :meth:`act` samples
    among the legal actions only, and :meth:`set_batch`'s ``action_mask`` makes the update score
    each action under the mask it was sampled with, as ``fastppo.categorical_logprob_entropy(...,
    mask=)`` does: the softmax over the legal logits only, gradient exactly 0 at an illegal logit,
    and a (component of a) row with no legal action has no choice (action 0, log-prob 0, entropy 0,
    zero gradient). Without a mask nothing of this runs.

    The module's parameters are moved into one flat buffer and keep being the module's
    parameters; Adam's moments live here (:meth:`state_dict`). Arguments are those of
    ``torch.optim.Adam`` (``lr``, ``betas``, ``eps``) and of ``fastppo.ppo_loss`` with
    ``agg="token-mean"``, plus ``max_grad_norm`` (``<= 0``: no clip). :attr:`lr` is the learning
    rate :meth:`update` uses when given none, settable (a learning-rate schedule sets it between
    updates, as CleanRL sets ``optimizer.param_groups[0]["lr"]``).

    A ``fastppo.recurrent.RecurrentAgent`` with LSTMs on vector observations (its ``trunk``
    ``nn.Flatten``) is fused too: :meth:`act` (and :meth:`bind_rollout`'s steps) step its LSTMs from
    a state the caller keeps, :meth:`set_sequences` gives the updates the rollout's layout, and each
    minibatch of whole environments is one call (the actor's and the critic's branches each on a
    thread when there are two; the results do not depend on it).

    Every call runs on the CPU, on a module whose parameters are on the CPU: build the module (and
    the rollout storage) there, not on a GPU. Inside its calls subnormal numbers are flushed to zero
    (below 1.2e-38 in float32, as under ``torch.set_flush_denormal(True)``; the caller's mode is
    restored after each call): Adam's moments of parameters whose gradient stays 0 would otherwise
    decay through the subnormals, which the CPU computes with slow microcode assists.
    """

    def __init__(self, module: nn.Module, *, lr: float = 3e-4, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-5, max_grad_norm: float = 0.5, clip_coef: float = 0.2, vf_coef: float = 0.5,
                 ent_coef: float = 0.0, clip_vloss: bool = True, vf_clip_coef: Optional[float] = None,
                 norm_adv: bool = True, nvec: Optional[Sequence[int]] = None, squash: str = "none"):
        trunk = getattr(module, "trunk", None)
        trunk_linears: List[nn.Linear] = []
        activation = None
        rnns = self._recurrent_layers(module)
        if rnns:
            pass  # the LSTM reads the (flat) observation: its trunk is nn.Flatten, checked there
        elif trunk is not None and not isinstance(trunk, nn.Identity):
            trunk_linears, activation = mlp_layers(trunk, last_linear=False)
        actor = getattr(module, "actor", getattr(module, "actor_mean", None))  # CleanRL's continuous agent: actor_mean
        if actor is None or not hasattr(module, "critic"):
            raise NotFusable(f"{type(module).__name__} has no `actor` (or `actor_mean`) and `critic` submodules")
        actor_linears, actor_act = mlp_layers(actor)
        critic_linears, critic_act = mlp_layers(module.critic)
        acts = {a for a in (activation, actor_act, critic_act) if a is not None}
        if len(acts) > 1:
            raise NotFusable(f"trunk, actor and critic must use one activation, got {sorted(acts)}")
        self.activation = acts.pop() if acts else "tanh"
        if critic_linears[-1].out_features != 1:
            raise NotFusable(f"the critic must end in 1 output, got {critic_linears[-1].out_features}")
        log_std = getattr(module, "actor_logstd", None)
        self.continuous = isinstance(log_std, Tensor)
        self.n_out = actor_linears[-1].out_features
        if self.continuous and tuple(log_std.shape) not in ((self.n_out,), (1, self.n_out)):
            raise NotFusable(f"actor_logstd must have shape [{self.n_out}] or [1, {self.n_out}], got {list(log_std.shape)}")
        self.kind, self.nvec = self._head_kind(module, nvec, squash)
        self.squashed = self.kind == "tanh_normal"
        self.n_components = len(self.nvec) if self.nvec else 1
        linears = trunk_linears + actor_linears + critic_linears
        dtype = _check_params(linears, type(module).__name__)
        named = [p for l in linears for p in (l.weight, l.bias)] + ([log_std] if self.continuous else [])
        for rnn in rnns:
            if rnn.hidden_size != actor_linears[0].in_features or rnn.hidden_size != critic_linears[0].in_features:
                raise NotFusable(f"actor and critic must read the LSTM's {rnn.hidden_size} units")
            for p in rnn.parameters():
                if p.dtype != dtype or not p.is_cpu or not p.is_contiguous():
                    raise NotFusable(f"the LSTM's parameters must be contiguous {dtype} on the CPU")
            named += list(rnn.parameters())
        self._rnns = rnns
        if len({id(p) for p in named}) != len(named):
            raise NotFusable("a parameter is shared between layers")
        others = {id(p) for p in module.parameters()} - {id(p) for p in named}
        if others:
            raise NotFusable(f"{type(module).__name__} has {len(others)} parameter(s) outside trunk/actor/critic/actor_logstd")
        self.module, self.dtype = module, dtype
        # The dtype names the argument checks ask for: parameters, actions, environment actions.
        self._dtype_name = B.DTYPE_NAMES[dtype]
        self._action_dtype = self._dtype_name if self.continuous else "int64"
        # A multi-discrete head's column offsets [K + 1] (for the mask checks of set_batch).
        self._offsets = np.cumsum((0,) + (self.nvec or (self.n_out,))).tolist()
        self._env_action_dtype = "float32" if self.continuous else "int32"
        self.obs_dim = rnns[0].input_size if rnns else (trunk_linears or actor_linears)[0].in_features
        self.recurrent = bool(rnns)
        self._sequences = None

        # One flat buffer for parameters, gradients and Adam's moments; each parameter becomes a view.
        n = sum(p.numel() for p in named)
        self.params = torch.empty(n, dtype=dtype)
        self.grads = torch.zeros(n, dtype=dtype)
        self.exp_avg = torch.zeros(n, dtype=dtype)
        self.exp_avg_sq = torch.zeros(n, dtype=dtype)
        offset = 0
        with torch.no_grad():
            for p in named:
                k = p.numel()
                self.params[offset:offset + k].copy_(p.reshape(-1))
                p.data = self.params[offset:offset + k].view_as(p)
                p.grad = self.grads[offset:offset + k].view_as(p)
                offset += k
        self._named, self._grad_views = named, [p.grad for p in named]
        self.step = 0
        self.lr = lr
        self._plan = _C.ActorCriticPlan(
            self._dtype_name, self.activation, _layer_specs(trunk_linears, True), _layer_specs(actor_linears, True),
            _layer_specs(critic_linears, True), self.continuous, log_std.data_ptr() if self.continuous else 0,
            log_std.grad.data_ptr() if self.continuous else 0, self.params.data_ptr(), self.grads.data_ptr(),
            self.exp_avg.data_ptr(), self.exp_avg_sq.data_ptr(), n, self.squashed, list(self.nvec or ()),
            [self._lstm_spec(rnn) for rnn in rnns])
        for name, value in (("eps", eps), ("clip_coef", clip_coef), ("vf_coef", vf_coef)):
            if not value >= 0:
                raise ValueError(f"FusedActorCritic: {name} must be >= 0, got {value}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"FusedActorCritic: betas must be in [0, 1), got {betas}")
        self._options = dict(clip_coef=clip_coef, vf_coef=vf_coef, ent_coef=ent_coef, vf_clip_coef=vf_clip_coef,
                             clip_vloss=clip_vloss, norm_adv=norm_adv, max_grad_norm=max_grad_norm, betas=betas, eps=eps)
        self._set_options(**self._options)
        self._batch = None
        self._low = self._high = None

    def _set_options(self, clip_coef, vf_coef, ent_coef, vf_clip_coef, clip_vloss, norm_adv, max_grad_norm, betas,
                     eps) -> None:
        self._plan.set_options(clip_coef, vf_coef, ent_coef, clip_coef if vf_clip_coef is None else vf_clip_coef,
                               clip_vloss, norm_adv, max_grad_norm, betas[0], betas[1], eps)

    def set_clip_coef(self, clip_coef: float) -> None:
        """The surrogate clipping coefficient of the next updates (and the value clip's, when the
        constructor's ``vf_clip_coef`` was None: it follows ``clip_coef``), for a schedule that
        anneals it (sb3's ``clip_range`` schedules)."""
        if not clip_coef >= 0:
            raise ValueError(f"FusedActorCritic.set_clip_coef: clip_coef must be >= 0, got {clip_coef}")
        self._options["clip_coef"] = float(clip_coef)
        self._set_options(**self._options)

    @staticmethod
    def _recurrent_layers(module: nn.Module) -> list:
        """A recurrent agent's LSTMs (``fastppo.recurrent.RecurrentAgent``: the actor's, then the
        critic's, or the one they share), or [] for a feed-forward module."""
        if not getattr(module, "recurrent", False):
            return []
        rnns = list(getattr(module, "rnns", ()))
        if getattr(module, "cell", None) != "lstm" or not rnns:
            raise NotFusable(f"the fused step runs an LSTM policy; this one's cell is {getattr(module, 'cell', None)!r}")
        if not isinstance(getattr(module, "trunk", None), nn.Flatten) or getattr(module, "scale", 1.0) != 1.0:
            raise NotFusable("the fused recurrent step reads vector observations (no CNN before the LSTM)")
        for rnn in rnns:
            lstm_parameters(rnn)  # raises for anything but a plain one-layer LSTM
        return rnns

    @staticmethod
    def _lstm_spec(rnn: nn.LSTM) -> tuple:
        params = lstm_parameters(rnn)
        ptrs = [0 if t is None else t.data_ptr() for t in params]
        grads = [0 if t is None else t.grad.data_ptr() for t in params]
        return (*ptrs, *grads, rnn.input_size, rnn.hidden_size)

    def set_sequences(self, starts: Tensor, state: Tensor) -> None:
        """A recurrent actor-critic's rollout layout, after :meth:`set_batch` on its ``T * N`` rows
        (row ``t * N + e``: step ``t`` of environment ``e``): ``starts`` bool ``[T, N]`` (the state is
        reset to zeros before the step: its observation starts an episode) and ``state`` ``[K, N,
        H]`` in the parameters' dtype (the LSTMs' ``h``, ``c`` when the rollout began, as
        ``RecurrentAgent`` keeps them). Held by reference until the next call. A minibatch
        (:meth:`update`) is then whole environments: ``idx`` ``[T * n]`` lists step ``t`` of its
        ``n`` environments at ``t * n .. t * n + n``, in time-major order."""
        if not self.recurrent:
            raise ValueError("set_sequences: the actor-critic is not recurrent")
        if self._batch is None:
            raise RuntimeError("set_sequences: call set_batch first")
        B.require_contiguous("set_sequences", "starts", starts, "torch", ("bool",))
        if starts.dim() != 2 or starts.numel() != self._batch_size:
            raise ValueError(f"set_sequences: starts must have shape [T, N] with T * N = {self._batch_size} (the "
                             f"batch's rows), got {list(starts.shape)}")
        T, N = starts.shape
        shape = (2 * len(self._rnns), N, self._rnns[0].hidden_size)  # h and c of each LSTM
        B.require_contiguous("set_sequences", "state", state, "torch", (self._dtype_name,), shape)
        self._sequences = (starts, state, T, N)
        self._plan.set_sequences(T, N, starts.data_ptr(), state.data_ptr())

    def _head_kind(self, module: nn.Module, nvec, squash: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
        """(kind, nvec) of the policy head: ``module.head``'s where it has one, else ``nvec``'s and
        ``squash``'s; checked against the actor's width and ``actor_logstd``."""
        if squash not in ("none", "tanh"):
            raise ValueError(f"FusedActorCritic: squash must be 'none' or 'tanh', got {squash!r}")
        head = getattr(module, "head", None)  # fastppo.agent.Agent's ActionHead
        if head is not None:
            kind = getattr(head, "kind", None)
            if kind not in ("categorical", "multi_categorical", "normal", "tanh_normal"):
                raise NotFusable(f"{type(module).__name__}'s policy head is {kind}; the fused step runs categorical, "
                                 "multi-categorical, Gaussian and tanh-squashed Gaussian heads")
            if nvec is not None or squash != "none":
                raise ValueError(f"FusedActorCritic: {type(module).__name__} has a policy head ({kind}); nvec and "
                                 "squash are for modules without one")
            nvec = head.nvec if kind == "multi_categorical" else None
        elif nvec is not None:
            kind = "multi_categorical"
        else:
            kind = ("tanh_normal" if squash == "tanh" else "normal") if self.continuous else "categorical"
        if kind in ("normal", "tanh_normal") and not self.continuous:
            raise NotFusable(f"a {kind} head needs actor_logstd (a state-independent log-std [D])")
        if kind in ("categorical", "multi_categorical") and self.continuous:
            raise NotFusable(f"a {kind} head has no actor_logstd; {type(module).__name__} has one")
        if squash == "tanh" and not self.continuous:
            raise ValueError("FusedActorCritic: squash='tanh' squashes a Gaussian policy (a module with actor_logstd)")
        if nvec is not None:
            if (not isinstance(nvec, (list, tuple)) or not nvec
                    or any(not isinstance(n, numbers.Integral) or n < 1 for n in nvec) or sum(nvec) != self.n_out):
                raise ValueError(f"FusedActorCritic: nvec must be a list of component sizes >= 1 summing to the actor's "
                                 f"{self.n_out} outputs, got {nvec!r}")
            nvec = tuple(int(n) for n in nvec)
        return kind, nvec

    def _action_shape(self, rows: int) -> Tuple[int, ...]:
        """One call's actions: ``[rows]``, ``[rows, K]`` or ``[rows, D]``."""
        if self.continuous:
            return (rows, self.n_out)
        return (rows, self.n_components) if self.nvec else (rows,)

    @property
    def lr(self) -> float:
        """The learning rate of :meth:`update` calls given no ``lr`` (float, >= 0)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        if not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
            raise ValueError(f"FusedActorCritic: lr must be a finite number >= 0, got {value!r}")
        self._lr = float(value)

    # -------------------------------------------------------------- rollout inference

    def set_action_bounds(self, low: np.ndarray, high: np.ndarray) -> None:
        """Bounds ``[D]`` (or scalars) of a Gaussian policy's float32 environment actions: the sample
        is clipped to them, or (``tanh_normal``) squashed into them, which must then be finite with
        ``low < high``."""
        self._low = np.ascontiguousarray(np.broadcast_to(low, (self.n_out,)), np.float32)
        self._high = np.ascontiguousarray(np.broadcast_to(high, (self.n_out,)), np.float32)
        if self.squashed and not (np.isfinite(self._low).all() and np.isfinite(self._high).all()
                                  and (self._low < self._high).all()):
            low, high, self._low, self._high = self._low, self._high, None, None
            raise ValueError(f"set_action_bounds: the tanh-squashed head maps its actions into [low, high], which must "
                             f"be finite with low < high; got low {low.tolist()}, high {high.tolist()}")

    def _action_mask(self, fn: str, name: str, mask, shape: Tuple[int, ...]) -> Tensor:
        """A discrete head's legal actions ``mask`` (bool, of ``shape``, CPU; numpy or torch) as a
        C-contiguous bool tensor (``mask`` itself, or its copy)."""
        if self.continuous:
            raise ValueError(f"{fn}: {name} selects among a categorical or multi-discrete policy's actions; this "
                             f"policy's head is {self.kind}")
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        B.require_array(fn, name, mask, "torch", ("bool",))
        if tuple(mask.shape) != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(mask.shape)}; expected {shape} (one entry per action"
                             f"{', flat over the components' if self.nvec else ''})")
        if not mask.is_cpu:
            raise ValueError(f"{fn}: {name} is on {mask.device}; expected the CPU")
        return mask if mask.is_contiguous() else mask.contiguous()

    def act(self, obs, noise=None, *, mask=None, state=None, start=None, action=None, logprob=None, value=None,
            env_action=None):
        """Samples actions for ``obs [rows, obs_dim]`` (contiguous rows, the parameters' dtype) and
        writes them with their log-probs and the values; no autograd.

        A recurrent actor-critic steps its LSTMs once from ``state`` (required): ``[K, rows, H]`` in
        the parameters' dtype, C-contiguous, the ``h`` and ``c`` of each LSTM as
        :meth:`set_sequences` takes them, updated in place to the state after the step; ``start``
        (None, or bool ``[rows]``, torch or numpy) resets a row's state to zeros before the step
        (its observation starts an episode).

        ``noise``: uniform ``[rows, A]`` in [0, 1) (Gumbel-max sampling of each categorical
        component) or standard normal ``[rows, D]`` (``mean + exp(log_std) * noise``), the
        parameters' dtype; None takes the greedy action (argmax among the legal actions, or the
        mean). ``mask`` (discrete heads): None, or bool ``[rows, A]`` (torch or numpy), the legal
        actions: only they are sampled and the log-prob is that of the softmax over them; a
        component without a legal action takes action 0 with log-prob 0. Outputs, allocated when
        not given: ``action`` (categorical: int64 ``[rows]``; multi-discrete: int64 ``[rows, K]``;
        Gaussian: ``[rows, D]`` in the parameters' dtype, the sample before any clipping or squash),
        ``logprob`` and ``value`` ``[rows]`` in the parameters' dtype; ``env_action`` (optional numpy
        array): int32 ``[rows]`` / ``[rows, K]``, or float32 ``[rows, D]`` in the bounds of
        :meth:`set_action_bounds` (clipped, or squashed). Returns ``(action, logprob, value)``.
        """
        obs = self._rows(obs, "obs", self.obs_dim)
        rows = obs.shape[0]
        self._plan.refresh()
        if noise is not None:
            noise = self._rows(noise, "noise", self.n_out).contiguous()  # read as packed rows
            if noise.shape[0] != rows:
                raise ValueError(f"act: noise has {noise.shape[0]} rows, obs {rows}")
        if mask is not None:
            mask = self._action_mask("act", "mask", mask, (rows, self.n_out))
        state, start = self._step_state(state, start, rows)
        action_shape = self._action_shape(rows)
        if action is None:
            action = torch.empty(action_shape, dtype=self.dtype if self.continuous else torch.int64)
        logprob = torch.empty(rows, dtype=self.dtype) if logprob is None else logprob
        value = torch.empty(rows, dtype=self.dtype) if value is None else value
        for name, x, dtype, shape in (("action", action, self._action_dtype, action_shape),
                                      ("logprob", logprob, self._dtype_name, (rows,)),
                                      ("value", value, self._dtype_name, (rows,))):
            B.require_contiguous("act", name, x, "torch", (dtype,), shape)
        if env_action is not None:
            B.require_contiguous("act", "env_action", env_action, "numpy", (self._env_action_dtype,), action_shape)
            if self.continuous and self._low is None:
                raise ValueError("act: call set_action_bounds before asking for continuous env actions")
        self.act_at(rows, obs.data_ptr(), obs.stride(0), 0 if noise is None else noise.data_ptr(), action.data_ptr(),
                    logprob.data_ptr(), value.data_ptr(), 0 if env_action is None else env_action.ctypes.data,
                    0 if mask is None else mask.data_ptr(), 0 if state is None else state.data_ptr(),
                    0 if start is None else start.data_ptr())
        return action, logprob, value

    def _require_state(self, fn: str, state, starts, rows: int) -> None:
        """A recurrent actor-critic's step state: C-contiguous ``[K, rows, H]`` in the parameters'
        dtype on the CPU (the ``h`` and ``c`` of each LSTM); a feed-forward one takes no state or starts."""
        if not self.recurrent:
            if state is not None or starts is not None:
                raise ValueError(f"{fn}: state and start are a recurrent actor-critic's; this one is feed-forward")
            return
        shape = (2 * len(self._rnns), rows, self._rnns[0].hidden_size)
        if state is None:
            raise ValueError(f"{fn}: a recurrent actor-critic steps from its state: pass state [K, rows, H] = "
                             f"{list(shape)} (zeros before the first step)")
        B.require_contiguous(fn, "state", state, "torch", (self._dtype_name,), shape)
        if not state.is_cpu:
            raise ValueError(f"{fn}: state must be on the CPU, got {state.device}")

    def _step_state(self, state, start, rows: int):
        """:meth:`act`'s ``state`` and ``start``, checked: (None, None) for a feed-forward
        actor-critic, else the state tensor and the starts as a uint8 view (or None)."""
        self._require_state("act", state, start, rows)
        if not self.recurrent:
            return None, None
        if start is not None:
            if isinstance(start, np.ndarray):
                start = torch.from_numpy(start)
            B.require_array("act", "start", start, "torch", ("bool",))
            if tuple(start.shape) != (rows,):
                raise ValueError(f"act: start must have shape [{rows}] (one flag per row), got {list(start.shape)}")
            start = start.contiguous().view(torch.uint8)
        return state, start

    def refresh(self) -> None:
        """Call after changing the parameters from outside (``load_state_dict``, a torch optimizer):
        rollout inference reads a transposed copy of the weights that :meth:`update` keeps current."""
        self._plan.refresh()

    def act_at(self, rows: int, obs: int, ldobs: int, noise: int, action: int, logprob: int, value: int,
               env_action: int = 0, mask: int = 0, state: int = 0, start: int = 0) -> None:
        """:meth:`act` on raw addresses (the trainer's per-step call: no checks, no allocation; the
        weights as of the last :meth:`update` or :meth:`refresh`); ``mask``: 0 or the address of the
        C-contiguous bool ``[rows, A]`` legal actions; ``state``, ``start``: a recurrent
        actor-critic's (0 for none)."""
        low = self._low.ctypes.data if self._low is not None else 0
        high = self._high.ctypes.data if self._high is not None else 0
        self._plan.act(rows, obs, ldobs, noise, action, logprob, value, env_action, low, high, mask, state, start)

    def bind_rollout(self, obs: np.ndarray, noise: Tensor, action: Tensor, logprob: Tensor, value: Tensor,
                     env_action: np.ndarray, mask=None, state: Optional[Tensor] = None, starts=None):
        """Binds rollout storage for per-step inference and returns ``act_step(t)``, which acts on
        ``obs[t]`` with ``noise[t]`` (and ``mask[t]``) and writes ``action[t]``, ``logprob[t]``,
        ``value[t]`` and ``env_action[t]`` (one call with one integer: the trainer's rollout step).

        ``obs`` ``[>= T, N, obs_dim]`` (numpy or tensor) in the parameters' dtype; ``noise``
        ``[T, N, n_out]``; ``action`` int64 ``[T, N]`` (categorical), int64 ``[T, N, K]``
        (multi-discrete) or ``[T, N, D]`` in the parameters' dtype (Gaussian); ``logprob``, ``value``
        ``[T, N]``; ``env_action`` numpy int32 ``[T, N]`` / ``[T, N, K]`` or float32 ``[T, N, D]``;
        ``mask`` (discrete heads) None or bool ``[T, N, A]`` (numpy or tensor), the legal actions of
        each step, read when ``act_step(t)`` runs (so the caller writes ``mask[t]`` before); all
        C-contiguous CPU memory, kept alive by the caller while ``act_step`` is used.

        A recurrent actor-critic's steps also read and update ``state`` ``[K, N, H]`` (as :meth:`act`'s,
        carried from each step to the next) and reset it where ``starts[t]`` is set (``starts`` None, or
        bool ``[T, N]``, numpy or tensor, read when ``act_step(t)`` runs)."""
        T, N = value.shape if isinstance(value, Tensor) and value.dim() == 2 else (-1, -1)
        if T < 0:
            raise ValueError(f"bind_rollout: value must be a [T, N] tensor, got {list(getattr(value, 'shape', []))}")
        action_shape = (T, N) + self._action_shape(N)[1:]
        obs_t = torch.from_numpy(obs) if isinstance(obs, np.ndarray) else obs
        checks = [("obs", obs_t, self._dtype_name, None), ("noise", noise, self._dtype_name, (T, N, self.n_out)),
                  ("action", action, self._action_dtype, action_shape),
                  ("logprob", logprob, self._dtype_name, (T, N)), ("value", value, self._dtype_name, (T, N))]
        for name, x, dtype, shape in checks:
            B.require_contiguous("bind_rollout", name, x, "torch", (dtype,), shape)
        if obs_t.dim() != 3 or obs_t.shape[0] < T or obs_t.shape[1:] != (N, self.obs_dim):
            raise ValueError(f"bind_rollout: obs must have shape [>= {T}, {N}, {self.obs_dim}], got {list(obs_t.shape)}")
        B.require_contiguous("bind_rollout", "env_action", env_action, "numpy", (self._env_action_dtype,), action_shape)
        if self.continuous and self._low is None:
            raise ValueError("bind_rollout: call set_action_bounds before asking for continuous env actions")
        if mask is not None:
            if self.continuous:
                self._action_mask("bind_rollout", "mask", mask, ())  # raises: a Gaussian head takes no mask
            B.require_contiguous("bind_rollout", "mask", torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask,
                                 "torch", ("bool",), (T, N, self.n_out))
        self._require_state("bind_rollout", state, starts, N)
        if self.recurrent and starts is not None:
            B.require_contiguous("bind_rollout", "starts",
                                 torch.from_numpy(starts) if isinstance(starts, np.ndarray) else starts, "torch",
                                 ("bool",), (T, N))

        def row(x) -> Tuple[int, int]:  # (address, bytes per step)
            if isinstance(x, np.ndarray):
                return x.ctypes.data, x.strides[0]
            return x.data_ptr(), x.stride(0) * x.element_size()

        low = self._low.ctypes.data if self._low is not None else 0
        high = self._high.ctypes.data if self._high is not None else 0
        self._plan.bind_rollout(N, *row(obs_t), *row(noise), *row(action), *row(logprob), *row(value),
                                *row(env_action), low, high, T, *(row(mask) if mask is not None else (0, 0)),
                                0 if state is None else state.data_ptr(), *(row(starts) if starts is not None else (0, 0)))
        self._bound = (obs, noise, action, logprob, value, env_action, self._low, self._high, mask, state,
                       starts)  # kept alive
        return self._plan.act_step

    def _rows(self, x, name: str, width: int) -> Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        B.require_array("act", name, x, "torch", (self._dtype_name,))
        if not x.is_cpu:
            raise ValueError(f"act: {name} must be on the CPU, got {x.device}")
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"act: {name} must have shape [rows, {width}], got {list(x.shape)}")
        return x if x.stride(1) == 1 and x.stride(0) >= width else x.contiguous()

    # -------------------------------------------------------------- minibatch updates

    def set_batch(self, obs: Tensor, actions: Tensor, logprobs: Tensor, advantages: Tensor, returns: Tensor,
                  values: Tensor, mask: Optional[Tensor] = None, action_mask: Optional[Tensor] = None) -> None:
        """The rollout ``[B, ...]`` that :meth:`update` draws minibatches from (held by reference:
        keep the tensors alive and unchanged until the next ``set_batch``). ``obs [B, obs_dim]``,
        ``logprobs``, ``advantages``, ``returns``, ``values`` ``[B]``, all in the parameters' dtype
        and C-contiguous; ``mask`` bool ``[B]`` (False: left out of every mean, as
        ``fastppo.ppo_loss``'s mask).

        ``actions``: a Gaussian head's ``[B, D]`` in the parameters' dtype, C-contiguous (the
        tanh-squashed head's: the pre-squash samples ``u``); a categorical head's ``[B]`` (a
        multi-discrete head's ``[B, K]``) action indices in ``[0, A)`` (each component's in ``[0,
        nvec[k])``), int64 C-contiguous (read in place) or any integer or float dtype and strides
        (CleanRL keeps them in a float32 tensor), which is checked to hold whole numbers in range
        and copied once into int64 here (so that copy, not ``actions``, is what later updates read).

        ``action_mask`` (discrete heads): None, or bool ``[B, A]``, the legal actions each row's
        action was sampled among (C-contiguous is read in place, else copied once): each action is
        then scored under its mask. A taken action that its mask marks illegal, where an action of
        its component is legal, is a ``ValueError``."""
        B.require_array("set_batch", "obs", obs, "torch")
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"set_batch: obs must have shape [B, {self.obs_dim}], got {list(obs.shape)}")
        n = obs.shape[0]
        if not self.continuous:
            actions = self._action_indices(actions, n)
        if action_mask is not None:
            action_mask = self._action_mask("set_batch", "action_mask", action_mask, (n, self.n_out))
            if not self.continuous:
                self._check_legal(actions, action_mask)
        checks = [("obs", obs, self._dtype_name, (n, self.obs_dim)),
                  ("actions", actions, self._action_dtype, self._action_shape(n))]
        checks += [(name, x, self._dtype_name, (n,)) for name, x in (("logprobs", logprobs), ("advantages", advantages),
                                                                    ("returns", returns), ("values", values))]
        if mask is not None:
            checks.append(("mask", mask, "bool", (n,)))
        for name, x, dtype, shape in checks:
            B.require_contiguous("set_batch", name, x, "torch", (dtype,), shape)
        self._batch = (obs, actions, logprobs, advantages, returns, values, mask, action_mask)
        self._batch_size = n
        self._plan.set_batch(obs.data_ptr(), actions.data_ptr(), logprobs.data_ptr(), advantages.data_ptr(),
                             returns.data_ptr(), values.data_ptr(), 0 if mask is None else mask.data_ptr(),
                             0 if action_mask is None else action_mask.data_ptr())

    def _action_indices(self, actions, n: int) -> Tensor:
        """A discrete head's ``actions`` ``[n]`` (``[n, K]``) as the int64 C-contiguous indices that
        the compiled update reads (unchecked there): ``actions`` itself when it is one, else a copy."""
        B.require_array("set_batch", "actions", actions, "torch", _CATEGORICAL_ACTION_DTYPES,
                        "int64 (or another integer or a float dtype holding action indices)")
        shape = self._action_shape(n)
        if tuple(actions.shape) != shape:
            raise ValueError(f"set_batch: actions has shape {tuple(actions.shape)}; expected {shape}")
        if not actions.is_cpu:
            raise ValueError(f"set_batch: actions is on {actions.device}; expected the CPU")
        if actions.dtype != torch.int64 or not actions.is_contiguous():
            indices = torch.empty(shape, dtype=torch.int64).copy_(actions)  # floats are truncated: checked below
            if actions.is_floating_point():
                inexact = (indices.to(actions.dtype) != actions).reshape(n, -1)  # fractions, NaN, inf, out of int64
                if bool(inexact.any()):
                    row = int(inexact.nonzero()[0, 0])
                    raise ValueError(f"set_batch: actions must hold whole action indices, got {actions[row].tolist()} "
                                     f"at row {row} ({actions.dtype})")
            actions = indices
        if n:
            sizes = self.nvec or (self.n_out,)
            for k, size in enumerate(sizes):
                column = actions if not self.nvec else actions[:, k]
                low, high = (int(v) for v in torch.aminmax(column))
                if low < 0 or high >= size:
                    where = f" (component {k} of nvec {list(sizes)})" if self.nvec else ""
                    raise ValueError(f"set_batch: actions must be action indices in [0, {size}){where}, got values "
                                     f"from {low} to {high}")
        return actions

    def _check_legal(self, actions: Tensor, action_mask: Tensor) -> None:
        """Every taken action must be legal under ``action_mask`` where an action of its component is."""
        n, K = actions.shape[0], self.n_components
        if n == 0:
            return
        columns = actions.reshape(n, K) + torch.tensor(self._offsets[:-1], dtype=torch.int64)
        taken = action_mask.gather(1, columns)
        offsets = self._offsets
        has_legal = torch.stack([action_mask[:, offsets[k]:offsets[k + 1]].any(1) for k in range(K)], 1)
        bad = has_legal & ~taken
        if bool(bad.any()):
            row, k = (int(v) for v in bad.nonzero()[0])
            what = f"component {k}'s action {int(actions.reshape(n, K)[row, k])}" if self.nvec else \
                f"action {int(actions[row])}"
            raise ValueError(f"set_batch: actions holds at row {row} {what}, which action_mask marks illegal (and "
                             f"{int(bad.sum()) - 1} more such); expected a legal action (action_mask True) wherever "
                             "one is legal")

    def update(self, idx, lr: Optional[float] = None, stats: Optional[np.ndarray] = None) -> np.ndarray:
        """One minibatch update on rows ``idx`` (``[M]``) of the batch: forward, heads, the clipped
        loss, backward into the parameters' ``.grad``, the grad-norm clip and one Adam step at ``lr``
        (default: :attr:`lr`). ``idx``: a torch tensor or numpy array of any integer dtype and
        strides (CleanRL's ``b_inds[start:end]`` is numpy int64); int64 C-contiguous is read in
        place, anything else copied once into int64. Returns ``stats``, a numpy float64 ``[7]``
        array: pg_loss, v_loss, entropy, approx_kl, old_approx_kl, clipfrac, the grad norm before
        clipping (written into ``stats`` when given, a C-contiguous float64 ``[7]`` array)."""
        if self._batch is None:
            raise RuntimeError("update: call set_batch first")
        rows, address, low, high = self._minibatch_rows(idx)  # rows: the int64 indices read, alive until returning
        if low < 0 or high >= self._batch_size:
            raise ValueError(f"update: idx must be in [0, {self._batch_size}), got values from {low} to {high}")
        if self.recurrent:
            self._check_sequence_rows(torch.as_tensor(rows))
        if stats is None:
            stats = np.zeros(7)
        else:
            B.require_contiguous("update", "stats", stats, "numpy", ("float64",), (7,))
        for p, view in zip(self._named, self._grad_views):  # module.zero_grad() may have dropped the views
            if p.grad is None:
                p.grad = view
        self._plan.refresh()  # the parameters may have been changed from outside since the last update
        self.update_at(rows.shape[0], address, self.lr if lr is None else lr, stats.ctypes.data)
        return stats

    def _check_sequence_rows(self, rows: Tensor) -> None:
        """A recurrent minibatch's rows must be whole environments, time-major (see :meth:`set_sequences`)."""
        if self._sequences is None:
            raise RuntimeError("update: a recurrent actor-critic needs set_sequences after set_batch")
        _, _, T, N = self._sequences
        M = rows.numel()
        if M % T:
            raise ValueError(f"update: a recurrent minibatch is whole environments' T = {T} steps; got {M} rows")
        grid = rows.view(T, M // T)
        first = grid[0]
        if bool((first >= N).any()) or not torch.equal(grid, first[None] + N * torch.arange(T)[:, None]):
            raise ValueError("update: a recurrent minibatch's idx must list steps t * N + e of whole environments e, "
                             "in time-major order (t = 0 .. T-1, the same environments at each t)")

    @staticmethod
    def _minibatch_rows(idx) -> tuple:
        """``idx`` as the compiled update reads it: (``idx`` or its int64 copy, its address, min, max)."""
        kind = B.require_array("update", "idx", idx, None, _INDEX_DTYPES, "int64 (or another integer dtype)")
        if idx.ndim != 1:
            raise ValueError(f"update: idx must be 1-D [M], got shape {tuple(idx.shape)}")
        if idx.shape[0] == 0:
            raise ValueError("update: idx is empty")
        if kind == "numpy":
            if not (idx.dtype == np.int64 and idx.flags.c_contiguous and idx.flags.aligned):  # also byte-swapped
                idx = np.ascontiguousarray(idx, dtype=np.int64)
            return idx, idx.ctypes.data, int(idx.min()), int(idx.max())
        if not idx.is_cpu:
            raise ValueError(f"update: idx is on {idx.device}; expected the CPU")
        if idx.dtype != torch.int64 or not idx.is_contiguous():
            idx = torch.empty(idx.shape[0], dtype=torch.int64).copy_(idx)
        low, high = torch.aminmax(idx)
        return idx, idx.data_ptr(), int(low), int(high)

    def update_at(self, M: int, idx: int, lr: float, stats: int, group: int = 0, group_size: int = 1,
                  apply_step: bool = True) -> None:
        """:meth:`update` on raw addresses (the trainer's call: indices already checked; the forward
        pass reads the transposed weights as of the last update or :meth:`refresh`). Data-parallel
        training passes ``group``, the address of the group's float64 ``[3]`` advantage moments
        (see ``fastppo.ppo_loss``'s ``group_moments``) and ``group_size``, and ``apply_step=False``:
        the call then stops with the gradients in :attr:`grads` (for their all-reduce), and
        :meth:`apply_at` does the clip and the Adam step."""
        if apply_step:
            self.step += 1
        self._plan.update(M, idx, lr, self.step + (0 if apply_step else 1), stats, group, float(group_size), apply_step)

    def update_rows(self, idx: Tensor, lr: float, stats: np.ndarray, group_moments: Optional[Tensor] = None,
                    group_size: int = 1) -> None:
        """:meth:`update_at` of a training loop's minibatch: ``idx`` a contiguous int64 slice of an index
        tensor already checked to lie in the batch, ``stats`` the C-contiguous float64 ``[7]`` row the
        stats go to. With ``group_moments`` (float64 ``[3]``) the call stops with the gradients in
        :attr:`grads`, and :meth:`apply_gradients` does the clip and the Adam step after their all-reduce."""
        self.update_at(idx.numel(), idx.data_ptr(), lr, stats.ctypes.data,
                       0 if group_moments is None else group_moments.data_ptr(), group_size, group_moments is None)

    def apply_gradients(self, lr: float, stats: np.ndarray) -> None:
        """:meth:`apply_at`, the grad norm going to ``stats[6]`` of a float64 ``[7]`` row."""
        self.apply_at(lr, stats.ctypes.data)

    def apply_at(self, lr: float, stats: int) -> None:
        """The grad-norm clip (its norm into ``stats[6]``) and the Adam step over :attr:`grads`."""
        self.step += 1
        self._plan.apply(lr, self.step, stats)

    def state_dict(self) -> dict:
        """Adam's state (step and moments), for checkpoints."""
        return dict(step=self.step, exp_avg=self.exp_avg.clone(), exp_avg_sq=self.exp_avg_sq.clone())

    def load_state_dict(self, state: dict) -> None:
        for name in ("exp_avg", "exp_avg_sq"):
            if tuple(state[name].shape) != tuple(self.exp_avg.shape):
                raise ValueError(f"load_state_dict: {name} has {state[name].numel()} elements, expected {self.exp_avg.numel()}")
            getattr(self, name).copy_(state[name])
        self.step = int(state["step"])
        self.refresh()
