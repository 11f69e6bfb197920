"""Optimizer steps for a model stored in bfloat16 or float16: float32 master weights and Adam moments,
and for float16 a dynamic loss scale.

The model keeps its parameters, activations and gradients in its own dtype (that is where the memory
goes); the optimizer works on a float32 copy of each 16-bit trainable parameter (its master weight),
so its moments are float32 and an update smaller than the 16-bit spacing of a weight is not lost:
after backward each gradient is widened into its master copy, the masters are averaged over the
ranks, clipped and stepped, and the model's parameters are rounded once from them. A float32 or
float64 parameter is its own master, and the step is :func:`fastppo.learner.apply_gradients`, as it
was. A float16 model's loss is multiplied by ``torch.amp.GradScaler``'s scale before backward (its
small gradients would flush to zero otherwise); a step whose gradients overflow is skipped and the
scale lowered.

Memory per 16-bit trainable parameter: 2 bytes (weight) + 2 (gradient) + 4 (master) + 8 (Adam
moments) + 4 (the master's gradient, during the step) = 20 bytes, against 16 in float32; the
frozen reference and reward models take half of float32's.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..learner import apply_gradients
from .models import LOW_PRECISION


class MasterWeights:
    """The float32 masters of ``params`` (built once; pass :attr:`master` to the optimizer).

    Args:
        params: the trainable parameters, in the order the optimizer will see their masters.
        device_type: ``"cpu"`` or ``"cuda"``, for float16's ``GradScaler``.
    """

    def __init__(self, params: Iterable[nn.Parameter], device_type: str = "cpu"):
        self.params = list(params)
        self.master = [nn.Parameter(p.detach().float().clone()) if p.dtype in LOW_PRECISION else p
                       for p in self.params]
        self._copies = [(p, m) for p, m in zip(self.params, self.master) if m is not p]
        fp16 = any(p.dtype == torch.float16 for p in self.params)
        self.scaler = torch.amp.GradScaler(device_type) if fp16 else None

    @property
    def low_precision(self) -> bool:
        """Whether any parameter has a master copy of its own."""
        return bool(self._copies)

    def zero_grad(self) -> None:
        """Drops the gradients of the parameters and of their masters (``set_to_none``)."""
        for p in self.params + self.master:
            p.grad = None

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, the loss scaled first for a float16 model."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float] = None, group=None,
             averaged: Optional[Sequence[Tensor]] = None) -> Optional[Tensor]:
        """After backward: the gradients widened into the masters, their mean over ``group``'s ranks
        (those of ``averaged``, parameters of the model, default all), the norm clipped to
        ``max_grad_norm`` (None: not clipped), the optimizer's step (skipped by the loss scale on an
        overflow), and the parameters rounded from their masters. Returns the gradient norm before
        clipping (None when not clipped)."""
        for p, m in self._copies:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        to_master = {id(p): m for p, m in zip(self.params, self.master)}
        masters = None if averaged is None else [to_master[id(p)] for p in averaged]
        if self.scaler is None and max_grad_norm is not None:
            norm = apply_gradients(optimizer, self.master, max_grad_norm, group, masters)
        else:
            if group is not None:
                grads = [m.grad for m in (self.master if masters is None else masters) if m.grad is not None]
                if grads:
                    group.average_(grads)
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            norm = None if max_grad_norm is None else nn.utils.clip_grad_norm_(self.master, max_grad_norm)
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
                self.scaler.update()
        with torch.no_grad():
            for p, m in self._copies:
                p.copy_(m)
        return norm

    def state_dict(self) -> dict:
        """The masters of the 16-bit parameters (their values are more than the rounded model's) and
        the loss scale's state."""
        return {"master": [m.detach().clone() for _, m in self._copies],
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        masters = state["master"]
        if len(masters) != len(self._copies):
            raise ValueError(f"MasterWeights: the state holds {len(masters)} master weights; this model has "
                             f"{len(self._copies)} 16-bit trainable parameters")
        with torch.no_grad():
            for (p, m), saved in zip(self._copies, masters):
                m.copy_(saved)
                p.copy_(m)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
