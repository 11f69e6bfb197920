"""Data-parallel PPO across processes with ``torch.distributed``, as ``torchrun`` launches it.

K processes (ranks) each step their own environments and learn as one policy:

- every rank starts from rank 0's weights, and every minibatch's gradients are averaged over the
  ranks with one flattened all-reduce, so the parameters stay bit-identical across ranks;
- the advantage normalization and every mean of the loss are taken over the union of the ranks'
  minibatches: each rank's (count, mean, m2) of its selected advantages are all-gathered and
  merged (Chan et al.) in rank order, and ``fastppo.ppo_loss`` / the fused update take the merged
  moments. K ranks with minibatch m therefore make the update one process makes with minibatch
  K * m (to rounding), dummy reset steps and all;
- running observation / reward normalization statistics are merged the same way at the end of
  every rollout; during a rollout every rank normalizes with the same (merged) statistics.

gloo on the CPU, NCCL on CUDA. Outside ``torchrun`` (no ``RANK`` / ``WORLD_SIZE`` in the
environment) nothing here is used.
"""

from __future__ import annotations

import gc
import os
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

# Imported before any group exists, on purpose: torch.distributed.nn.functional's functions take
# ``group=group.WORLD`` as a default argument, evaluated when the module is first imported, and any
# optimizer's constructor imports it (through torch._dynamo). Imported while the group exists, it
# keeps the group alive past destroy_process_group(), so gloo's worker threads live on into the
# interpreter's shutdown, where one that drops the last reference to its last collective's tensor
# takes the GIL, is ended by pthread_exit and aborts the process ("terminate called without an
# active exception"). Imported first, the default is None and close() ends the group and its threads.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

from .envstep import merge_moments

__all__ = ["Group", "in_torchrun"]


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class Group:
    """This process's place in the data-parallel group and the collectives the trainers use.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; each rank uses GPU ``LOCAL_RANK``).
    """

    def __init__(self, device_type: str = "cpu"):
        if not in_torchrun():
            raise RuntimeError("fastppo.distributed.Group: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set; "
                               "launch with torchrun")
        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
        self.device = torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device("cpu")
        self._owns = not dist.is_initialized()
        self._mesh = None  # FSDP's device mesh, made by the first shard()
        if self._owns:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.size)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, TensorBoard and checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Ends the group (when this Group began it) and with it gloo's threads, which must not outlive
        it into the interpreter's shutdown (see the import of torch.distributed.nn above)."""
        if self._owns and dist.is_initialized():
            gc.collect()  # sharded modules dropped by the caller hold the group in reference cycles
            dist.destroy_process_group()
            if self._mesh is not None:
                # torch's DTensor caches (redistribution plans, mesh topologies) keep a mesh for the
                # life of the process, and the mesh keeps its process groups: it lets go of ours.
                getattr(self._mesh, "_pg_registry", {}).clear()
                self._mesh = None

    # ------------------------------------------------------------------ collectives

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """``[K, *x.shape]`` float64: every rank's ``x`` in rank order."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(self.device)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return torch.stack(parts).cpu().numpy()

    def merged_moments(self, local: np.ndarray) -> np.ndarray:
        """The group's moments from every rank's ``local`` ``[3, ...]`` (count, mean, m2), merged in
        rank order, so every rank gets the same bits."""
        parts = self.all_gather(local)
        total = parts[0]
        for part in parts[1:]:
            total = merge_moments(total, part)
        return total

    def advantage_moments(self, advantages: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The group's float64 ``[M, 3]`` (count, mean, m2) of the selected advantages of each of
        ``M`` minibatches, from this rank's ``advantages`` ``[M, m]`` (and ``mask``): one all-gather
        for all of them. Row i is what ``ppo_loss(..., group_moments=...)`` takes for minibatch i."""
        adv = advantages.detach().to(torch.float64)
        sel = torch.ones_like(adv) if mask is None else mask.to(torch.float64)
        count = sel.sum(1)
        mean = (adv * sel).sum(1) / count.clamp(min=1)
        m2 = (((adv - mean[:, None]) * sel) ** 2).sum(1)
        local = torch.stack([count, mean, m2]).cpu().numpy()  # [3, M]
        return torch.from_numpy(np.ascontiguousarray(self.merged_moments(local).T)).to(advantages.device)

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replaces each tensor by its mean over the ranks: one all-reduce of their concatenation."""
        one = len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == self.device
        flat = tensors[0].view(-1) if one else torch.cat([t.reshape(-1) for t in tensors]).to(self.device)
        dist.all_reduce(flat)
        flat /= self.size
        if one:  # reduced in place (the fused policy's flat gradient buffer): nothing to copy back
            return
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum(self, values: Sequence[float]) -> List[float]:
        """Each value summed over the ranks."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every rank's tensors become rank 0's."""
        for t in tensors:
            buf = t.detach().to(self.device)
            dist.broadcast(buf, 0)
            if buf is not t:
                t.detach().copy_(buf)

    def gather_objects(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` (picklable) in rank order on rank 0; None on the others."""
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: every rank must ask)."""
        return self.sum([float(bool(flag))])[0] == self.size

    def shard(self, module: torch.nn.Module, methods: Sequence[str] = ()) -> torch.nn.Module:
        """FSDP2's ``fully_shard`` over the group: each block of every ``ModuleList`` (a
        transformer's layers) is its own unit, then the root; parameters become DTensors sharded
        across the ranks, gathered per unit for its forward and backward, and their gradients are
        reduce-scattered (averaged over the ranks) by backward itself. ``methods``: the module's
        methods other than ``forward`` that run it (they gather its parameters too)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if self._mesh is None:  # one mesh for every module, which close() can let go of
            self._mesh = init_device_mesh(self.device.type, (self.size,))
        for child in list(module.modules()):
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=self._mesh)
        fully_shard(module, mesh=self._mesh)
        for name in methods:
            register_fsdp_forward_method(module, name)
        return module

    def merge_env_statistics(self, boundary) -> None:
        """Folds every rank's pending observation / return moments (an ``EnvStepBoundary`` with
        ``defer_stats()``) into the running statistics, identically on every rank."""
        obs, ret = boundary.pending_moments()
        merged = self.merged_moments(np.concatenate([obs, ret], axis=1))
        boundary.absorb_pending(merged[:, :obs.shape[1]], merged[:, obs.shape[1]:])
