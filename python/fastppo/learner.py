"""The PPO update: epochs of shuffled minibatches of the clipped loss, one ``Learner`` for both
policy backends.

``fused`` runs each minibatch as one call into :class:`fastppo.policy.FusedActorCritic` (forward,
heads, loss, backward, grad clip, Adam); ``torch`` runs the agent's ``get_action_and_value``,
``fastppo.ppo_loss``, ``backward``, ``clip_grad_norm_`` and ``torch.optim.Adam``. Both compute the
same update. In a data-parallel group each minibatch's advantage moments and loss means are the
group's, and the gradients are averaged over the ranks before the clip and the Adam step, so the
ranks' parameters stay bit-identical.

A recurrent agent's rollout comes as a :class:`SequenceBatch` (torch backend): its minibatches are
sets of whole environments, each environment's ``T`` steps in order, run through the RNN in one
call per minibatch (:meth:`fastppo.recurrent.RecurrentAgent.evaluate_sequences`).

:func:`apply_gradients` is that last part alone (the ranks' mean, the clip, the optimizer step),
shared by every torch update in fastppo, including those whose loss differs (``fastppo.sb3``,
``fastppo.rlhf``).
"""

from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import fastppo
from fastppo.recurrent import plan_segments

__all__ = ["Batch", "Learner", "SequenceBatch", "UPDATE_STATS", "apply_gradients"]

# A minibatch update's stats by name: PPOLossOutput's fields after the loss, FusedActorCritic's row (+ grad norm).
UPDATE_STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac")
_APPROX_KL = UPDATE_STATS.index("approx_kl")


class Batch(NamedTuple):
    """A rollout flattened to ``B`` rows: ``obs [B, *obs_shape]``, ``actions [B]`` (int64),
    ``[B, K]`` (int64, MultiDiscrete) or ``[B, D]`` (float32, Box), ``logprobs``, ``advantages``,
    ``returns``, ``values`` ``[B]``, ``mask`` bool ``[B]`` (False: left out of every mean of the
    loss) or None, ``action_mask`` bool ``[B, A]`` (the legal actions each row's action was sampled
    among, ``A`` = n or sum(nvec); the update scores the action under it) or None."""

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    advantages: Tensor
    returns: Tensor
    values: Tensor
    mask: Optional[Tensor] = None
    action_mask: Optional[Tensor] = None


class SequenceBatch(NamedTuple):
    """A recurrent agent's rollout of ``T`` steps of ``N`` environments: ``rows``, its :class:`Batch`
    of ``T * N`` rows in time-major order (row ``t * N + e``), ``starts`` bool ``[T, N]`` (the state
    is reset before step ``t`` of environment ``e``: its observation starts an episode) and
    ``state`` ``[K, N, H]``, the agent's recurrent state when the rollout began (before row 0's resets)."""

    rows: Batch
    starts: Tensor
    state: Tensor


def apply_gradients(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], max_grad_norm: float,
                    group=None, averaged: Optional[Sequence[Tensor]] = None) -> Tensor:
    """After ``backward``: the gradients' mean over the ranks of ``group`` (one all-reduce of those of
    ``averaged``, default all of ``params``), ``clip_grad_norm_`` of ``params`` and the optimizer step.
    Returns the gradient norm before clipping."""
    params = list(params)
    if group is not None:
        grads = [p.grad for p in (params if averaged is None else averaged) if p.grad is not None]
        if grads:
            group.average_(grads)
    norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return norm


class Learner:
    """Epochs of minibatch updates of the clipped PPO loss on an actor-critic ``agent``.

    Args:
        agent: the ``nn.Module``; the torch backend calls its ``get_action_and_value(obs, action)``
            (returning ``(action, logprob, entropy, value)``), the fused backend needs the shape
            :class:`~fastppo.policy.FusedActorCritic` takes (and builds one: :attr:`fused`).
        backend: ``"fused"`` or ``"torch"``.
        lr, betas, eps: Adam's (``lr`` is the default of :meth:`update`'s).
        max_grad_norm: the gradient-norm clip of each step.
        clip_coef, vf_coef, ent_coef, clip_vloss, vf_clip_coef, norm_adv: ``fastppo.ppo_loss``'s.
        update_epochs, num_minibatches: an update's passes over the batch, minibatches per pass.
        target_kl: stop the epochs early when the last minibatch's approx_kl (the group's mean)
            exceeds it (None: never).
        group: a :class:`fastppo.distributed.Group` for data-parallel training, or None.
        ppo_loss: the torch backend's loss (the benchmark suite's eager baseline swaps it).
    """

    def __init__(self, agent: nn.Module, backend: str = "torch", *, lr: float = 3e-4,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-5, max_grad_norm: float = 0.5,
                 clip_coef: float = 0.2, vf_coef: float = 0.5, ent_coef: float = 0.0, clip_vloss: bool = True,
                 vf_clip_coef: Optional[float] = None, norm_adv: bool = True, update_epochs: int = 1,
                 num_minibatches: int = 1, target_kl: Optional[float] = None, group=None,
                 ppo_loss=fastppo.ppo_loss):
        if backend not in ("fused", "torch"):
            raise ValueError(f"Learner: backend must be fused or torch, got {backend!r}")
        for name, value in (("update_epochs", update_epochs), ("num_minibatches", num_minibatches)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Learner: {name} must be an integer >= 1, got {value!r}")
        self.agent, self.backend, self.lr, self.max_grad_norm = agent, backend, lr, max_grad_norm
        self.update_epochs, self.num_minibatches, self.target_kl = update_epochs, num_minibatches, target_kl
        self.group, self.ppo_loss, self.clip_coef = group, ppo_loss, clip_coef
        self.group_size = 1 if group is None else group.size
        self.loss_options = dict(clip_coef=clip_coef, vf_coef=vf_coef, ent_coef=ent_coef, clip_vloss=clip_vloss,
                                 norm_adv=norm_adv, **({} if vf_clip_coef is None else dict(vf_clip_coef=vf_clip_coef)))
        self.fused = self.optimizer = None
        if backend == "fused":
            from fastppo.policy import FusedActorCritic

            self.fused = FusedActorCritic(agent, lr=lr, betas=betas, eps=eps, max_grad_norm=max_grad_norm,
                                          clip_coef=clip_coef, vf_coef=vf_coef, ent_coef=ent_coef, clip_vloss=clip_vloss,
                                          vf_clip_coef=vf_clip_coef, norm_adv=norm_adv)
        else:
            # On the CPU torch's fused Adam: one kernel over every parameter, not ~10 ops per tensor
            # (0.15 ms against 0.58 ms a step for the 16 tensors of the recurrent policy); the same
            # update to rounding.
            params = list(agent.parameters())
            fused_adam = bool(params) and all(p.is_cpu and p.dtype in (torch.float32, torch.float64) for p in params)
            self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps,
                                              **(dict(fused=True) if fused_adam else {}))
        self._batch: Optional[Batch] = None
        self._sequences: Optional[SequenceBatch] = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Adam's state (the fused policy's or torch's), for checkpoints."""
        return (self.fused or self.optimizer).state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Adam's state from :meth:`state_dict`; call after loading the agent's parameters (the fused
        policy then refreshes its copy of the weights)."""
        (self.fused or self.optimizer).load_state_dict(state)

    # ------------------------------------------------------------------ updates

    def set_batch(self, batch: Batch) -> None:
        """The batch that :meth:`minibatch` draws rows from (held by reference until the next one)."""
        self._batch = batch
        if self.fused is not None:
            self.fused.set_batch(*batch)

    def update(self, batch, lr: Optional[float] = None, clip_coef: Optional[float] = None) -> List[float]:
        """``update_epochs`` epochs over ``batch``, each a fresh ``torch.randperm`` cut into
        ``num_minibatches`` minibatches, at learning rate ``lr`` (default: the constructor's);
        ``target_kl`` may stop after any epoch. A :class:`SequenceBatch` (a recurrent agent's) is cut
        into minibatches of whole environments instead: a permutation of the ``N`` environments
        (none with one minibatch), ``N / num_minibatches`` of them per minibatch. ``clip_coef``: the
        surrogate clipping coefficient of this update (and of the value clip when it follows it;
        default: the constructor's; the torch backend only). Returns the mean of each of
        :data:`UPDATE_STATS` over the minibatches done (and over the group's ranks)."""
        lr = self.lr if lr is None else lr
        self.loss_options["clip_coef"] = self.clip_coef if clip_coef is None else clip_coef
        if self.fused is not None:
            self.fused.set_clip_coef(self.loss_options["clip_coef"])
        if isinstance(batch, SequenceBatch):
            if not getattr(self.agent, "recurrent", False):
                raise ValueError("Learner.update: a SequenceBatch needs a recurrent agent (evaluate_sequences)")
            self._sequences = batch
            self.set_batch(batch.rows)
            mean = self._sequence_epochs(lr)
        else:
            if getattr(self.agent, "recurrent", False):
                raise ValueError("Learner.update: a recurrent agent learns from a SequenceBatch (whole environments' "
                                 f"sequences), got {type(batch).__name__}")
            self.set_batch(batch)
            mean = self._fused_epochs(lr) if self.fused is not None else self._torch_epochs(lr)
        if self.group is not None:
            mean = [x / self.group_size for x in self.group.sum(mean)]
        return mean

    def minibatch(self, idx: Tensor, lr: Optional[float] = None, group_moments: Optional[Tensor] = None,
                  stats: Optional[np.ndarray] = None) -> np.ndarray:
        """One minibatch update on rows ``idx`` (int64 ``[M]``) of the batch of :meth:`set_batch`.
        ``group_moments``: in a group, the group's float64 ``[3]`` advantage moments of this
        minibatch (``fastppo.ppo_loss``'s). Returns ``stats`` (float64 ``[7]``: :data:`UPDATE_STATS`
        and the gradient norm before clipping)."""
        if getattr(self.agent, "recurrent", False):
            raise ValueError("Learner.minibatch: a recurrent agent's minibatches are whole environments' sequences; "
                             "call update() with a SequenceBatch")
        lr = self.lr if lr is None else lr
        stats = np.zeros(7) if stats is None else stats
        if self.fused is not None:
            if self.group is None:
                return self.fused.update(idx, lr=lr, stats=stats)
            self._fused_step(idx.contiguous(), lr, stats, group_moments)
            return stats
        self._set_lr(lr)
        out, norm = self._torch_step(idx, group_moments)
        stats[:6] = torch.stack([getattr(out, name) for name in UPDATE_STATS]).tolist()
        stats[6] = float(norm)
        return stats

    def _group_mean(self, value: float) -> float:
        return value if self.group is None else self.group.sum([value])[0] / self.group_size

    def _minibatch_moments(self, order: Tensor) -> Optional[Tensor]:
        """The group's advantage moments of each minibatch of this epoch's order, [num_minibatches, 3]."""
        if self.group is None:
            return None
        batch, shape = self._batch, (self.num_minibatches, order.numel() // self.num_minibatches)
        mask = None if batch.mask is None else batch.mask[order].view(shape)
        return self.group.advantage_moments(batch.advantages[order].view(shape), mask)

    def _fused_step(self, idx: Tensor, lr: float, stats: np.ndarray, moments: Optional[Tensor]) -> None:
        if moments is None:
            self.fused.update_rows(idx, lr, stats)
        else:  # gradients, their mean over the ranks, then the clip and Adam step
            self.fused.update_rows(idx, lr, stats, moments, self.group_size)
            self.group.average_([self.fused.grads])
            self.fused.apply_gradients(lr, stats)

    def _fused_epochs(self, lr: float) -> List[float]:
        # Each minibatch is one call: forward, heads, clipped loss, backward, grad clip and Adam.
        n = self._batch.obs.shape[0]
        size = n // self.num_minibatches
        stats = np.zeros((self.update_epochs * self.num_minibatches, len(UPDATE_STATS) + 1))
        done = 0
        for _ in range(self.update_epochs):
            order = torch.randperm(n)
            moments = self._minibatch_moments(order)
            for i, start in enumerate(range(0, n, size)):
                self._fused_step(order[start:start + size], lr, stats[done], None if moments is None else moments[i])
                done += 1
            if self.target_kl is not None and self._group_mean(stats[done - 1, _APPROX_KL]) > self.target_kl:
                break
        return stats[:done, :len(UPDATE_STATS)].mean(0).tolist()

    def _torch_step(self, idx: Tensor, moments: Optional[Tensor]):
        b = self._batch
        masks = {} if b.action_mask is None else dict(action_mask=b.action_mask[idx])
        _, logprob, entropy, value = self.agent.get_action_and_value(b.obs[idx], b.actions[idx], **masks)
        group = {} if moments is None else dict(group_moments=moments, group_size=self.group_size)
        out = self.ppo_loss(logprob, b.logprobs[idx], b.advantages[idx], value, b.values[idx], b.returns[idx], entropy,
                            mask=None if b.mask is None else b.mask[idx], **self.loss_options, **group)
        self.optimizer.zero_grad()
        out.loss.backward()
        return out, apply_gradients(self.optimizer, self.agent.parameters(), self.max_grad_norm, self.group)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _torch_epochs(self, lr: float) -> List[float]:
        self._set_lr(lr)
        n = self._batch.obs.shape[0]
        size = n // self.num_minibatches
        stats = []
        for _ in range(self.update_epochs):
            order = torch.randperm(n, device=self._batch.obs.device)
            moments = self._minibatch_moments(order)
            for i, start in enumerate(range(0, n, size)):
                out, _ = self._torch_step(order[start:start + size], None if moments is None else moments[i])
                stats.append(torch.stack([getattr(out, name) for name in UPDATE_STATS]))
            if self.target_kl is not None and self._group_mean(out.approx_kl.item()) > self.target_kl:
                break
        return torch.stack(stats).mean(0).tolist()

    def _sequence_epochs(self, lr: float) -> List[float]:
        # Minibatches of whole environments (CleanRL's ppo_atari_lstm.py, sb3-contrib's sequences).
        # Fused: each is one C++ call (the LSTMs over its T steps, heads, loss, backward through time,
        # grad clip and Adam); torch: one pass of each RNN over its environments' segments.
        seq, b = self._sequences, self._batch
        T, N = seq.starts.shape
        per = N // self.num_minibatches
        if per * self.num_minibatches != N:
            raise ValueError(f"Learner.update: num_minibatches ({self.num_minibatches}) must divide the "
                             f"environments of a SequenceBatch ({N}): each minibatch holds whole environments")
        device = b.obs.device
        steps = torch.arange(T, device=device)[:, None] * N
        fused = self.fused is not None
        if fused:
            self._fused_layout = (seq.starts.contiguous(), seq.state.contiguous())  # held while the calls read them
            self.fused.set_sequences(*self._fused_layout)
            table = np.zeros((self.update_epochs * self.num_minibatches, len(UPDATE_STATS) + 1))
        else:
            self._set_lr(lr)
            starts = seq.starts.cpu()
            plans = {}  # with one minibatch every epoch has the same environments, so the same segments
            stats = []
        done = 0
        for _ in range(self.update_epochs):
            order = torch.arange(N) if self.num_minibatches == 1 else torch.randperm(N)
            envs = order.view(self.num_minibatches, per)
            rows = (steps[None] + envs.to(device)[:, None, :]).reshape(self.num_minibatches, T * per)
            moments = self._sequence_moments(rows)
            for i in range(self.num_minibatches):
                moment = None if moments is None else moments[i]
                if fused:
                    self._fused_step(rows[i], lr, table[done], moment)
                else:
                    key = tuple(envs[i].tolist())
                    if key not in plans:
                        plans = {key: plan_segments(starts[:, envs[i]]).to(device)}
                    out, _ = self._sequence_step(rows[i], envs[i].to(device), plans[key], T, moment)
                    stats.append(torch.stack([getattr(out, name) for name in UPDATE_STATS]))
                done += 1
            if self.target_kl is not None:
                approx_kl = table[done - 1, _APPROX_KL] if fused else out.approx_kl.item()
                if self._group_mean(approx_kl) > self.target_kl:
                    break
        if fused:
            return table[:done, :len(UPDATE_STATS)].mean(0).tolist()
        return torch.stack(stats).mean(0).tolist()

    def _sequence_moments(self, rows: Tensor) -> Optional[Tensor]:
        """The group's advantage moments of each minibatch of rows ``[num_minibatches, m]``."""
        if self.group is None:
            return None
        b = self._batch
        return self.group.advantage_moments(b.advantages[rows], None if b.mask is None else b.mask[rows])

    def _sequence_step(self, idx: Tensor, envs: Tensor, plan, T: int, moments: Optional[Tensor]):
        """One minibatch of whole environments ``envs``: ``idx`` their rows ``[T * n]`` in time-major order."""
        b, seq = self._batch, self._sequences
        n = envs.numel()
        obs = b.obs[idx].view((T, n) + tuple(b.obs.shape[1:]))
        actions = b.actions[idx].view((T, n) + tuple(b.actions.shape[1:]))
        masks = {} if b.action_mask is None else dict(action_mask=b.action_mask[idx].view(T, n, -1))
        logprob, entropy, value = self.agent.evaluate_sequences(obs, actions, plan, seq.state[:, envs], **masks)
        group = {} if moments is None else dict(group_moments=moments, group_size=self.group_size)
        out = self.ppo_loss(logprob.reshape(-1), b.logprobs[idx], b.advantages[idx], value.reshape(-1), b.values[idx],
                            b.returns[idx], entropy.reshape(-1), mask=None if b.mask is None else b.mask[idx],
                            **self.loss_options, **group)
        self.optimizer.zero_grad()
        out.loss.backward()
        return out, apply_gradients(self.optimizer, self.agent.parameters(), self.max_grad_norm, self.group)
