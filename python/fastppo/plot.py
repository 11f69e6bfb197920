"""``fastppo plot``: learning curves of ``fastppo train`` runs from their ``metrics.jsonl``.

Runs are grouped by task and preset: each task is a panel, each preset a line, the mean over the
group's seeds with the band between their min and max. Reference lines (``--ref "CleanRL=1442.6"``)
mark published numbers. The figure is drawn on matplotlib's Agg canvas (a file, no display), so it
needs only ``pip install 'fastppo[plot]'``; ``benchmarks/mujoco_1m.py`` draws its figure with
:func:`plot_curves` too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np

# A run folder's files (fastppo.runs's names; that module imports torch, which plotting does not need).
CONFIG, METRICS = "config.json", "metrics.jsonl"

__all__ = ["Curve", "PlotArgs", "Reference", "draw_curves", "find_runs", "parse_reference", "plot_curves", "plot_runs", "read_run"]

# x axis name -> (metrics.jsonl key, axis label)
X_AXES = {"steps": ("global_step", "environment steps"), "seconds": ("time", "wall time (s)")}
METRIC_LABELS = {"episodic_return": "mean return (last 100 episodes)",
                 "episodic_return_last10": "mean return (last 10 episodes)", "sps": "steps per second"}
GRID_POINTS = 200  # where a group's curves are interpolated to take their mean, min and max


@dataclass
class Curve:
    """One run's curve: ``steps``, ``seconds`` and ``values`` float64 ``[n]`` (the iterations that
    logged the metric), the task it ran, its group (the preset) and its seed."""

    env_id: str
    group: str
    seed: Optional[int]
    steps: np.ndarray
    seconds: np.ndarray
    values: np.ndarray
    source: str = ""

    def x(self, axis: str) -> np.ndarray:
        return self.steps if axis == "steps" else self.seconds


@dataclass(frozen=True)
class Reference:
    """A horizontal line at ``value`` named ``label``, on the panels of ``env_id`` (None: all)."""

    label: str
    value: float
    env_id: Optional[str] = None


def parse_reference(text: str) -> Reference:
    """``LABEL=VALUE`` (every panel) or ``ENV_ID:LABEL=VALUE`` (that task's panel) as a :class:`Reference`."""
    head, sep, value = text.rpartition("=")
    env_id, colon, label = head.rpartition(":")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not label or number is None:
        raise ValueError(f"--ref must be LABEL=VALUE or ENV_ID:LABEL=VALUE (e.g. CleanRL=1442.6), got {text!r}")
    return Reference(label, number, env_id if colon else None)


def find_runs(paths: Sequence) -> List[Path]:
    """The run folders named by ``paths``: a folder with a metrics.jsonl, or a folder whose
    subfolders hold runs (``fastppo plot runs/``)."""
    found = []
    for path in map(Path, paths):
        if (path / METRICS).is_file():
            found.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if (p / METRICS).is_file()) if path.is_dir() else []
        if not inner:
            raise ValueError(f"{path} is not a run folder: it has no {METRICS}, nor do its subfolders")
        found += inner
    return found


def _records(path: Path) -> List[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            records.append(record)
    return records


def _metric_key(metric: str) -> str:
    """A metrics.jsonl key from either its own name or its tracked (CleanRL) name."""
    from fastppo.track import CLEANRL_NAMES

    tracked = {v: k for k, v in CLEANRL_NAMES.items()}
    return tracked.get(metric, metric)


def read_run(run_dir, metric: str = "episodic_return") -> Curve:
    """The curve of ``metric`` (a metrics.jsonl key such as ``episodic_return``, ``v_loss``, ``sps``,
    or its tracked name such as ``charts/episodic_return``) in the run folder ``run_dir``.

    Wall time runs on across a resume (each process logs the seconds since it started, so the
    seconds of the iterations before the resume are added to those after it)."""
    run_dir = Path(run_dir)
    key = _metric_key(metric)
    config = {}
    if (run_dir / CONFIG).is_file():
        try:
            config = json.loads((run_dir / CONFIG).read_text())
        except ValueError:
            config = {}
    records = _records(run_dir / METRICS)
    if records and not any(key in r for r in records):
        names = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
        raise ValueError(f"--metric {metric!r} is not logged in {run_dir / METRICS}; its metrics: {', '.join(names)}")
    steps, seconds, values = [], [], []
    offset, last_time, segment = 0.0, 0.0, None
    for r in records:
        if segment is not None and r.get("first_iteration") != segment:
            offset += last_time  # a resumed process: its clock starts again from 0
        segment, last_time = r.get("first_iteration"), float(r.get("time", 0.0))
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(float(r.get("global_step", len(steps))))
            seconds.append(offset + last_time)
            values.append(float(value))
    return Curve(env_id=config.get("env_id", run_dir.name), group=str(config.get("preset", "")), seed=config.get("seed"),
                 steps=np.array(steps), seconds=np.array(seconds), values=np.array(values), source=str(run_dir))


def _band(curves: Sequence[Curve], axis: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) of the curves on a shared grid over the range they all cover (one curve: its points)."""
    curves = [c for c in curves if c.values.size]
    if len(curves) == 1:
        c = curves[0]
        return c.x(axis), c.values, c.values, c.values
    lo = max(float(c.x(axis)[0]) for c in curves)
    hi = min(float(c.x(axis)[-1]) for c in curves)
    grid = np.linspace(lo, hi, GRID_POINTS) if hi > lo else np.array([hi])
    ys = np.stack([np.interp(grid, c.x(axis), c.values) for c in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot_curves(curves: Sequence[Curve], out, axes: Sequence[str] = ("steps",), metric: str = "episodic_return",
                references: Sequence[Reference] = (), ylabel: Optional[str] = None, columns: int = 3) -> Path:
    """Draws ``curves`` into the PNG ``out`` (:func:`draw_curves`) and returns its path."""
    fig = draw_curves(curves, axes, metric, references, ylabel, columns)
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def draw_curves(curves: Sequence[Curve], axes: Sequence[str] = ("steps",), metric: str = "episodic_return",
                references: Sequence[Reference] = (), ylabel: Optional[str] = None, columns: int = 3):
    """The figure (a matplotlib ``Figure`` on the Agg canvas) of ``curves``: a panel per task (in the
    order of the curves), a row of panels per x axis of ``axes`` (``steps`` / ``seconds``; one axis:
    the panels wrap at ``columns``), in each a line per group (the mean over its curves, with their
    min-max band) and the ``references`` as dashed lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    for axis in axes:
        if axis not in X_AXES:
            raise ValueError(f"--x must be one of {', '.join(X_AXES)}, got {axis!r}")
    curves = [c for c in curves if c.values.size]
    if not curves:
        raise ValueError(f"no run has logged {metric!r} yet (episodic_return: no episode has ended)")
    tasks = list(dict.fromkeys(c.env_id for c in curves))
    groups = sorted({c.group for c in curves})
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    if len(axes) > 1:
        rows, cols = len(axes), len(tasks)
        panels = [(axis, task, r, k) for r, axis in enumerate(axes) for k, task in enumerate(tasks)]
    else:
        cols = min(columns, len(tasks))
        rows = -(-len(tasks) // cols)
        panels = [(axes[0], task, i // cols, i % cols) for i, task in enumerate(tasks)]
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
    grid = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for k in range(cols):
            grid[r][k].set_visible(False)
    ref_styles = ["--", "-.", ":"]
    for axis, task, r, k in panels:
        ax = grid[r][k]
        ax.set_visible(True)
        for g in groups:
            members = [c for c in curves if c.env_id == task and c.group == g]
            if not members:
                continue
            x, mean, low, high = _band(members, axis)
            n = len(members)
            label = f"{g or 'run'}, mean of {n} seeds" if n > 1 else f"{g or 'run'}" + (
                f", seed {members[0].seed}" if members[0].seed is not None else "")
            ax.plot(x, mean, color=colors[g], linewidth=1.6, label=label)
            if n > 1:
                ax.fill_between(x, low, high, color=colors[g], alpha=0.2, linewidth=0)
        for i, ref in enumerate(ref for ref in references if ref.env_id in (None, task)):
            ax.axhline(ref.value, color="0.35", linestyle=ref_styles[i % len(ref_styles)], linewidth=1.2,
                       label=f"{ref.label} ({ref.value:g})")
        ax.set_title(task)
        ax.set_xlabel(X_AXES[axis][1])
        ax.set_ylabel(ylabel or METRIC_LABELS.get(_metric_key(metric), metric))
        if axis == "steps":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence, out, x: str = "steps", metric: str = "episodic_return",
              references: Sequence[Reference] = ()) -> Path:
    """:func:`plot_curves` of the runs in ``run_dirs`` (run folders, or folders of run folders)."""
    return plot_curves([read_run(d, metric) for d in find_runs(run_dirs)], out, (x,), metric, references)


@dataclass
class PlotArgs:
    run_dirs: Tuple[str, ...]
    """run folders (each with a metrics.jsonl), or folders holding run folders"""
    x: Literal["steps", "seconds"] = "steps"
    """the x axis: environment steps or wall time"""
    metric: str = "episodic_return"
    """a metrics.jsonl key (episodic_return, episodic_return_last10, sps, v_loss, pg_loss, entropy, approx_kl, ...) or its tracked name (charts/episodic_return, losses/value_loss, ...)"""
    out: str = "plot.png"
    """the PNG to write"""
    ref: Tuple[str, ...] = field(default_factory=tuple)
    """reference lines: LABEL=VALUE on every panel, ENV_ID:LABEL=VALUE on that task's (e.g. --ref CleanRL=1442.6)"""


def plot_main(argv=None) -> int:
    """``fastppo plot RUN_DIR... [--x steps|seconds] [--metric NAME] [--out FILE.png] [--ref LABEL=VALUE ...]``."""
    import tyro

    args = tyro.cli(PlotArgs, args=argv, prog="fastppo plot",
                    description="Learning curves of fastppo train runs: mean and min-max band over seeds, "
                                "grouped by task and preset.",
                    config=(tyro.conf.PositionalRequiredArgs, tyro.conf.PositionalMetavarFromFieldName))
    if not args.run_dirs:
        print("fastppo plot: error: give one or more run folders (fastppo plot RUN_DIR...)", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastppo plot: error: needs matplotlib: pip install 'fastppo[plot]'", file=sys.stderr)
        return 2
    try:
        references = [parse_reference(r) for r in args.ref]
        out = plot_runs(args.run_dirs, args.out, args.x, args.metric, references)
    except ValueError as err:
        print(f"fastppo plot: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
