"""Checkpoints (train and rlhf): data, not code, written atomically; loaded with a clear error; RNG states.

A checkpoint holds tensors, numbers, strings and lists / tuples / dicts of them only: numpy arrays
are stored as tensors, and loading uses ``torch.load(weights_only=True)``, so opening someone
else's run directory cannot run code from its pickle."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def as_data(obj):
    """``obj`` with every numpy array (and numpy scalar) made a tensor (a Python number): what
    ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: as_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_data(v) for v in obj)
    return obj


def load_data(path: Path):
    """``torch.load`` of data only (``weights_only=True``); anything else is a ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not what:
            raise  # not a disallowed object: a damaged file, reported as such by the caller
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data ({what[0]}); it is "
                              "refused: a checkpoint is data, not code") from err


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then a rename (and the directory flushed):
    a crash or power loss mid-write leaves the last checkpoint intact. A write that fails (a full
    disk, an I/O error) removes the temporary file and is a ``CheckpointError`` that names the file,
    the cause and says that the previous checkpoint is kept."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(as_data(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error(err)  # torch.save reports a failed write as a RuntimeError over the OSError
        if cause is None or not isinstance(err, Exception):
            raise
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"checkpoint {path} could not be written: no space left on the device (the disk is "
                                  f"full); {kept}") from err
        raise CheckpointError(f"checkpoint {path} could not be written ({type(cause).__name__}: {cause}); "
                              f"{kept}") from err
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, flushed to disk, then renames it over
    ``path``: a kill at any moment leaves the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _os_error(err: BaseException) -> Optional[OSError]:
    """The ``OSError`` in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def read_checkpoint(path: Path) -> dict:
    """``load_data`` of a checkpoint file, a damaged one (random bytes, cut short) being a
    ``CheckpointError`` that names the file and what the reader said."""
    try:
        state = load_data(path)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises several types for a damaged zip / pickle
        raise CheckpointError(f"checkpoint {path} is damaged and cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a fastppo checkpoint (it holds a {type(state).__name__})")
    return state


def checkpoint_kind(state: dict) -> Optional[str]:
    """Which fastppo command wrote ``state``: ``"train"``, ``"rlhf PPO"`` (a PPO run of ``fastppo
    rlhf``), ``"rlhf stages"`` (its SFT policy and reward model), or None."""
    if {"model", "args", "iteration"} <= state.keys():
        return "train"
    if {"trainer", "history", "iteration"} <= state.keys():
        return "rlhf PPO"
    if {"sft", "rm", "report"} <= state.keys():
        return "rlhf stages"
    return None


def describe(state: dict, path: Path) -> str:
    """What the checkpoint at ``path`` is and how its run continues, for error messages."""
    kind = checkpoint_kind(state)
    if kind == "train":
        args = state["args"] if isinstance(state["args"], dict) else {}
        return (f"the checkpoint of a fastppo train run on {args.get('env_id', 'an unknown task')} (iteration "
                f"{state['iteration']}; continue it with fastppo train --resume {path.parent})")
    if kind == "rlhf PPO":
        return (f"the checkpoint of a fastppo rlhf PPO run (iteration {state['iteration']}; continue it with "
                f"fastppo rlhf --resume --run-dir {path.parent.parent} and its other flags)")
    if kind == "rlhf stages":
        return (f"the stages (SFT policy and reward model) of a fastppo rlhf run (continue it with fastppo rlhf "
                f"--resume --run-dir {path.parent} and its other flags)")
    return "not a fastppo checkpoint"


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint written by ``train``; a missing, truncated or foreign file is a clear
    ``CheckpointError`` naming the file."""
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    state = read_checkpoint(path)
    if checkpoint_kind(state) in ("rlhf PPO", "rlhf stages"):
        raise CheckpointError(f"checkpoint {path} is {describe(state, path)}, not a fastppo training checkpoint")
    per_rank = {"boundary", "rng"}  # a data-parallel run's checkpoint keeps them per rank
    ranks = state.get("ranks")
    missing = {"model", "optimizer", "args", "iteration", "global_step"} - set(state)
    missing |= per_rank - set(state) if ranks is None else set().union(*(per_rank - set(r) for r in ranks))
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a fastppo training checkpoint (missing {sorted(missing)})")
    return state


def rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # the key array comes back from a checkpoint as a tensor
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
