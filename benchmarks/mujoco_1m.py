"""Learning quality: MuJoCo tasks at 1M steps with the MuJoCo preset (CleanRL's
ppo_continuous_action.py settings), several seeds, against CleanRL's published 1M-step returns.

    python -m benchmarks.mujoco_1m --env-id HalfCheetah-v5 --seed 1   # one run (about 3 min here)
    python -m benchmarks.mujoco_1m --all                              # every missing (env, seed) run
    python -m benchmarks.mujoco_1m --report                           # table and plot from the runs

Each run is stored as ``benchmarks/results/mujoco_1m/<env>__seed<k>.json`` (learning curve, steps
per second, the final return = mean of the last 10 training episodes, and the evaluation return of
the saved policy: ``fastppo eval``'s 10 episodes with the normalization statistics frozen), so runs
can be made one at a time; ``--report`` writes ``mujoco_1m.md`` and ``mujoco_1m.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import RESULTS  # python -m benchmarks.mujoco_1m
except ImportError:
    from _common import RESULTS  # python benchmarks/mujoco_1m.py

RUNS = RESULTS / "mujoco_1m"
# CleanRL's published results for ppo_continuous_action.py at 1M steps (v4 tasks; mean over seeds
# of the last episodes), from its documentation's benchmark table.
CLEANRL_1M = {"HalfCheetah-v5": 1442.6, "Hopper-v5": 2382.9, "Walker2d-v5": 2288.0}
SEEDS = (1, 2, 3)
# CleanRL's own script timed on this machine (not by this script): ppo_continuous_action.py on
# HalfCheetah-v4 (gymnasium 1.x compatibility patch only), 20,480 steps, its printed SPS.
CLEANRL_SPS_HERE = {"HalfCheetah-v5": 649}


def run_one(env_id: str, seed: int, steps: int, out: Path) -> dict:
    from fastppo import train as T
    from fastppo.evaluate import evaluate

    with tempfile.TemporaryDirectory() as root:
        args = T.Args(env_id=env_id, seed=seed, total_timesteps=steps, preset="mujoco", device="cpu", run_dir=root,
                      run_name="run", log_every=50, checkpoint_every=10**9)
        start = time.perf_counter()
        summary = T.train(args)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(root) / "run" / "metrics.jsonl").read_text().splitlines()]
        evaluation = evaluate(str(Path(root) / "run"), episodes=10)
    curve = [(r["global_step"], r["time"], r["episodic_return"]) for r in rows if r["episodic_return"] is not None]
    result = dict(env_id=env_id, seed=seed, steps=summary["global_step"], seconds=seconds,
                  sps=summary["global_step"] / seconds, final_return=summary["episodic_return_last10"],
                  final_return_last100=summary["episodic_return"], episodes=summary["episodes"],
                  eval_mean=evaluation["mean_return"], eval_std=evaluation["std_return"],
                  backend=summary["policy_backend"], curve=curve)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    return result


def load_runs() -> list:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(runs: list) -> str:
    import platform

    import fastppo

    lines = ["# MuJoCo at 1M steps (CPU)", "",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.machine()}, "
             f"fastppo {fastppo.__version__}; `{fastppo.build_info()}`",
             "- Preset `mujoco` (CleanRL's ppo_continuous_action.py: 1 env x 2048 steps, 32 minibatches, 10 epochs, "
             "lr 3e-4 annealed, obs and reward normalization, clip 0.2, tanh 64-64 MLPs, state-independent log-std), "
             "policy backend fused.",
             "- Final return: mean of the last 10 training episodes of a seed; table: mean +- std over seeds. "
             "Evaluation: the saved policy's mean action, normalization statistics frozen, 10 episodes per seed.",
             "- CleanRL: its published 1M-step results for ppo_continuous_action.py (v4 tasks).", "",
             "| task | seeds | final return | evaluation return | CleanRL | within one seed-std of CleanRL or above | "
             "steps/s | wall time per run (s) |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for env_id, ref in CLEANRL_1M.items():
        rs = [r for r in runs if r["env_id"] == env_id]
        if not rs:
            lines.append(f"| {env_id} | 0 | not run | | {ref} | | | |")
            continue
        m, s = mean_std([r["final_return"] for r in rs])
        em, es = mean_std([r["eval_mean"] for r in rs])
        ok = "yes" if m is not None and m + s >= ref else "no"
        per_seed = ", ".join(f"{r['final_return']:.0f}" for r in rs)
        lines.append(f"| {env_id} | {len(rs)} | {m:.1f} +- {s:.1f} ({per_seed}) | {em:.1f} +- {es:.1f} | {ref} | {ok} | "
                     f"{statistics.median(r['sps'] for r in rs):.0f} | {statistics.median(r['seconds'] for r in rs):.0f} |")
    for env_id, sps in CLEANRL_SPS_HERE.items():
        rs = [r for r in runs if r["env_id"] == env_id]
        if rs:
            ours = statistics.median(r["seconds"] for r in rs)
            lines += ["", f"- Wall time: CleanRL's ppo_continuous_action.py ran {env_id.replace('v5', 'v4')} at {sps} steps/s on "
                          f"this machine (timed by hand over 20,480 steps), about {1_000_000 / sps:.0f} s for 1M steps; fastppo's "
                          f"median run took {ours:.0f} s ({1_000_000 / sps / ours:.1f}x less)."]
    lines += ["", "Curves: `mujoco_1m.png` (mean and min-max over seeds of the mean return of the last 100 "
              "training episodes, against steps and against wall time; CleanRL's final numbers as dashed lines)."]
    return "\n".join(lines) + "\n"


def plot(runs: list, path: Path) -> None:
    """The curves of the stored runs, drawn by ``fastppo plot``'s :func:`fastppo.plot.plot_curves`: a panel per
    task, against steps (top) and wall time (bottom), CleanRL's 1M-step return as a dashed line."""
    import numpy as np

    from fastppo.plot import Curve, Reference, plot_curves

    curves = [Curve(r["env_id"], "fastppo", r["seed"], *(np.array([c[i] for c in r["curve"]], np.float64) for i in range(3)))
              for e in CLEANRL_1M for r in runs if r["env_id"] == e]
    if not curves:
        return
    references = [Reference("CleanRL at 1M steps", value, env_id) for env_id, value in CLEANRL_1M.items()]
    plot_curves(curves, path, axes=("steps", "seconds"), references=references)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", choices=list(CLEANRL_1M), help="one run of this task (with --seed)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="every (task, seed) run not stored yet")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--report", action="store_true", help="write mujoco_1m.md / .png from the stored runs")
    args = parser.parse_args(argv)
    todo = []
    if args.env_id:
        todo.append((args.env_id, args.seed))
    if args.all:
        todo += [(e, s) for e in CLEANRL_1M for s in SEEDS if not (RUNS / f"{e}__seed{s}.json").exists()]
    for env_id, seed in todo:
        print(f"{env_id} seed {seed} ...", file=sys.stderr, flush=True)
        r = run_one(env_id, seed, args.steps, RUNS / f"{env_id}__seed{seed}.json")
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    if args.report or not todo:
        runs = load_runs()
        text = report(runs)
        (RESULTS / "mujoco_1m.md").write_text(text)
        plot(runs, RESULTS / "mujoco_1m.png")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
