"""Run folders of ``fastppo train`` and ``fastppo rlhf``: their files, the settings a resume must
keep, the metrics log a killed run leaves behind, and the checks before a checkpoint is continued.

A ``fastppo train`` run's folder holds ``config.json`` (its settings, written when it starts),
``metrics.jsonl`` (one record per iteration), ``checkpoint.pt`` and TensorBoard's events. A
``fastppo rlhf`` run's holds ``args.json``, ``stages.pt``, ``summary.json``, ``rlhf.png`` and one
folder per PPO run (``kl/``, ``kl_off/``) with its ``metrics.jsonl`` and ``checkpoint.pt``.

Every file is replaced atomically or appended one whole record at a time, so a kill at any moment
leaves a folder that ``--resume`` continues: the log is cut back to the checkpoint's iteration.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from fastppo.checkpoint import CheckpointError, load_checkpoint, write_text_atomic

CONFIG, ARGS, CHECKPOINT, METRICS = "config.json", "args.json", "checkpoint.pt", "metrics.jsonl"


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def write_settings(path: Path, settings: dict, indent: int = 2) -> None:
    """A run's settings as JSON, replacing the file at once."""
    write_text_atomic(path, json.dumps(settings, indent=indent))


def read_settings(path: Path) -> dict:
    """The settings saved in ``path``; a damaged file is a ``CheckpointError`` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is damaged and cannot be read ({err})") from err


def is_train_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a ``fastppo train`` run (its config.json or checkpoint.pt)."""
    return (Path(run_dir) / CONFIG).exists() or checkpoint_path(run_dir).exists()


# ------------------------------------------------------------------ metrics.jsonl


def append_record(path: Path, record: dict) -> None:
    """Appends one record as a line; the file is opened per record, so an error anywhere leaves no
    file open, and a kill leaves at most a partial last line (which :func:`keep_log_until` drops)."""
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def write_log(path: Path, records: Sequence[dict]) -> None:
    """Replaces the log with ``records`` at once (a resume's log: exactly the checkpointed ones)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def keep_log_until(path: Path, iteration: int) -> None:
    """Cuts a metrics log back to the records of iterations up to ``iteration`` (a resume point; 0:
    none), replacing the file at once so that a kill while it is cut leaves the old log. A line that
    is not a whole record (a write cut short) is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("iteration", iteration + 1) <= iteration:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


# ------------------------------------------------------------------ checks before a resume


def check_world_size(state: dict, world_size: int, path: Path) -> None:
    """A checkpoint continues with as many processes as wrote it."""
    written = state.get("world_size", 1)
    if written != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {written} process(es); resume it with the same "
                              f"world size, not {world_size}")


def check_same_settings(what: str, saved: Mapping, asked: Mapping, *, task: str, asked_task: Optional[str] = None,
                        task_keys: Sequence[str], remedy: str) -> None:
    """``saved`` (a run's settings) against ``asked`` (this one's; only the keys of both are
    compared): a difference is a ``CheckpointError`` saying that ``what`` is from another task
    (``task``, formatted with ``saved``; ``asked_task`` with ``asked``, default ``task``) when a key of
    ``task_keys`` differs, else that its settings differ, naming each other setting as a flag with
    the saved and the asked value, and ending with ``remedy``."""
    differ = [name for name in asked if name in saved and saved[name] != asked[name]]
    if not differ:
        return
    flags = ", ".join(f"--{name.replace('_', '-')} {saved[name]} (asked: {asked[name]})"
                      for name in differ if name not in task_keys)
    if any(name in task_keys for name in differ):
        problem = f"{what} is from {task.format(**saved)}; this run asks for {(asked_task or task).format(**asked)}" + (
            f" (other settings differ too: {flags})" if flags else "")
    else:
        problem = f"{what} is from {task.format(**saved)} with other settings than asked: {flags}"
    raise CheckpointError(f"{problem}; {remedy}")


# ------------------------------------------------------------------ fastppo train's runs

# Where a run is and how often it prints: not what it computes, so a resume may give them.
PLACE_SETTINGS = ("run_dir", "run_name", "log_every")


def saved_args(fields: dict, source: Path):
    """The ``fastppo.train.Args`` saved in ``source`` (a checkpoint or config.json)."""
    from fastppo.config import Args

    try:  # JSON keeps a tuple setting (--hidden-sizes) as a list
        return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as err:
        raise CheckpointError(f"{source} holds settings fastppo train does not know ({err})") from err


def check_resumed_settings(asked, saved, source: Path) -> None:
    """A resume continues the saved run with its settings: ``asked`` must be the defaults (``Args()``,
    all that ``fastppo train --resume`` passes) or the saved run's settings, else the error names the
    task the checkpoint is from and the one asked for."""
    from fastppo.config import Args, resolve

    asked = dataclasses.replace(asked, **{name: getattr(Args(), name) for name in PLACE_SETTINGS})
    if asked == Args():
        return
    compared = [f.name for f in dataclasses.fields(Args) if f.name not in PLACE_SETTINGS]
    what = f"checkpoint {source}" if source.suffix == ".pt" else f"the run in {source.parent} (no checkpoint yet)"
    check_same_settings(what, dataclasses.asdict(saved), {name: getattr(resolve(asked), name) for name in compared},
                        task="a {env_id} run", asked_task="{env_id}", task_keys=("env_id",),
                        remedy="a resumed run continues with its saved settings (train(Args(), resume=...), "
                               "fastppo train --resume RUN_DIR alone): start a new run for other settings")


def resume_state(resume: str, asked) -> tuple:
    """What ``--resume RUN_DIR`` (or a checkpoint file) continues: ``(args, checkpoint, source)``,
    ``source`` being the checkpoint file, or the ``config.json`` of a run stopped before its first
    checkpoint (which starts over with those settings; ``checkpoint`` None). A checkpoint of another
    run than its directory's, or settings ``asked`` for another run than the saved one, are refused."""
    path = Path(resume)
    if path.is_dir() and not checkpoint_path(path).exists() and (path / CONFIG).exists():
        source, checkpoint = path / CONFIG, None
        saved = saved_args(read_settings(source), source)
    else:
        checkpoint = load_checkpoint(path)
        source = checkpoint_path(path) if path.is_dir() else path
        saved = saved_args(checkpoint["args"], source)
        config = source.parent / CONFIG
        try:
            made_for = json.loads(config.read_text()).get("env_id") if config.exists() else None
        except ValueError:
            made_for = None  # a damaged config.json says nothing about the checkpoint
        if made_for is not None and made_for != saved.env_id:
            raise CheckpointError(f"checkpoint {source} is from a {saved.env_id} run, but its directory holds a "
                                  f"{made_for} run (config.json): the checkpoint belongs to another run")
    check_resumed_settings(asked, saved, source)
    return saved, checkpoint, source


def start_run(run_args, resume: Optional[str], source: Optional[Path], group=None) -> Path:
    """The folder of the run: a resumed run's (``source``'s), or a new one named after ``run_args``
    (its ``run_name``, or the task, seed and time; rank 0's name on every rank), made with its
    ``config.json`` by rank 0."""
    is_main = group is None or group.is_main
    if resume is not None:
        if source.name == CONFIG and is_main:
            print(f"fastppo train: {source.parent} has no checkpoint (the run stopped before its first one): starting "
                  "it over with its saved settings", file=sys.stderr)
        return source.parent
    run_name = run_args.run_name or f"{run_args.env_id}__seed{run_args.seed}__{int(time.time())}"
    run_dir = Path(run_args.run_dir) / (run_name if group is None else group.broadcast_object(run_name))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_settings(run_dir / CONFIG, dataclasses.asdict(run_args))
    return run_dir


def restore_learning(checkpoint: dict, source: Path, agent, learner, backend: str, task: str) -> None:
    """The model and the optimizer's state from a train checkpoint; one trained with another policy
    backend, or whose model does not fit ``task`` (the task and its spaces, for the message), is a
    ``CheckpointError``."""
    saved_backend = checkpoint.get("policy_backend", "torch")
    if saved_backend != backend:
        raise CheckpointError(f"the checkpoint was trained with --policy-backend {saved_backend}; this run would use {backend}")
    try:
        agent.load_state_dict(checkpoint["model"])
        learner.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source} holds a model that does not fit {task}: {err}") from err
