"""Checkpoints written atomically (train and rlhf); a training checkpoint loaded with a clear error; RNG states."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then a rename (and the directory flushed):
    a crash or power loss mid-write leaves the last checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint written by ``train``; a missing, truncated or foreign file is a clear
    ``CheckpointError`` naming the file."""
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged zip / pickle
        raise CheckpointError(f"checkpoint {path} is damaged and cannot be read ({type(err).__name__}: {err})") from err
    per_rank = {"boundary", "rng"}  # a data-parallel run's checkpoint keeps them per rank
    ranks = state.get("ranks") if isinstance(state, dict) else None
    missing = {"model", "optimizer", "args", "iteration", "global_step"} - set(state)
    missing |= per_rank - set(state) if ranks is None else set().union(*(per_rank - set(r) for r in ranks))
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a fastppo training checkpoint (missing {sorted(missing)})")
    return state


def rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
