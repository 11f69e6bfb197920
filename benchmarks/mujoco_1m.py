"""Learning quality: MuJoCo tasks at 1M steps with each MuJoCo configuration, several seeds,
against CleanRL's and rl-baselines3-zoo's published 1M-step returns.

    python -m benchmarks.mujoco_1m --config mujoco-zoo --env-id HalfCheetah-v5 --seed 1   # one run
    python -m benchmarks.mujoco_1m --config mujoco-zoo --all     # every missing (env, seed) run of a config
    python -m benchmarks.mujoco_1m --report                      # table and plot from the stored runs

The configurations (``CONFIGS``): ``mujoco`` (the preset of CleanRL's ppo_continuous_action.py
settings), ``mujoco-fast`` (the preset of the same settings with the batch from two environments
of half the steps each, stepped on two EnvPool threads), ``mujoco-zoo`` (rl-baselines3-zoo's tuned
settings of each task, one environment) and ``mujoco-zoo-2env`` (those with two environments of half
the steps). Each run is stored as ``benchmarks/results/mujoco_1m/<config>/<env>__seed<k>.json``
(learning curve, steps per second, the final return = mean of the last 10 training episodes, the
evaluation return of the saved policy: ``fastppo eval``'s 10 episodes with the normalization
statistics frozen, the load average around the run), so runs can be made one at a time, each on an
otherwise idle machine; ``--report`` writes ``mujoco_1m.md`` and ``mujoco_1m.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
# rl-baselines3-zoo's published PPO results at 1M steps (its benchmark.md, v3 tasks: mean +- std of the
# deterministic policy's evaluation episodes), the settings of the mujoco-zoo preset.
ZOO_1M = {"HalfCheetah-v5": (5819.1, 663.5), "Hopper-v5": (2410.4, 10.0), "Walker2d-v5": (3478.8, 821.7)}
SEEDS = (1, 2, 3)


def _two_envs(preset: str):
    """The preset's batch per update from twice its environments, each of half the steps."""
    def changes(env_id: str) -> dict:
        from fastppo.config import preset_values

        values = preset_values(preset, env_id)
        return dict(num_envs=2 * values["num_envs"], num_steps=values["num_steps"] // 2)
    return changes


# Each configuration: its preset and what it changes for a task.
CONFIGS = {
    "mujoco": ("mujoco", lambda env_id: {}),
    "mujoco-fast": ("mujoco-fast", lambda env_id: {}),
    "mujoco-zoo": ("mujoco-zoo", lambda env_id: {}),
    "mujoco-zoo-2env": ("mujoco-zoo", _two_envs("mujoco-zoo")),
}


def run_one(config: str, env_id: str, seed: int, steps: int, out: Path) -> dict:
    import fastppo
    from fastppo import train as T
    from fastppo.evaluate import evaluate

    preset, changes = CONFIGS[config]
    with tempfile.TemporaryDirectory() as root:
        args = T.Args(env_id=env_id, seed=seed, total_timesteps=steps, preset=preset, device="cpu", run_dir=root,
                      run_name="run", log_every=50, checkpoint_every=10**9, **changes(env_id))
        load_before = os.getloadavg()
        start = time.perf_counter()
        summary = T.train(args)
        seconds = time.perf_counter() - start
        load_after = os.getloadavg()
        settings = json.loads((Path(root) / "run" / "config.json").read_text())
        rows = [json.loads(line) for line in (Path(root) / "run" / "metrics.jsonl").read_text().splitlines()]
        evaluation = evaluate(str(Path(root) / "run"), episodes=10)
    curve = [(r["global_step"], r["time"], r["episodic_return"]) for r in rows if r["episodic_return"] is not None]
    result = dict(config=config, env_id=env_id, seed=seed, steps=summary["global_step"], seconds=seconds,
                  sps=summary["global_step"] / seconds, final_return=summary["episodic_return_last10"],
                  final_return_last100=summary["episodic_return"], episodes=summary["episodes"],
                  eval_mean=evaluation["mean_return"], eval_std=evaluation["std_return"],
                  backend=summary["policy_backend"], load_before=load_before, load_after=load_after,
                  date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", build=fastppo.build_info(),
                  settings=settings, curve=curve)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    return result


def load_runs() -> list:
    """Every stored run, each with its ``config`` (runs stored before configurations: ``mujoco``)."""
    runs = [dict(json.loads(p.read_text()), config=p.parent.name) for p in sorted(RUNS.glob("*/*.json"))]
    return [r for r in runs if r["config"] in CONFIGS]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def time_cleanrl(script: Path, python: str, env_id: str, steps: int) -> dict:
    """CleanRL's own ``ppo_continuous_action.py`` run unchanged as its users run it, in the
    environment CleanRL pins (``python`` with gymnasium 0.29.1, mujoco 2.3.x, tyro, tensorboard,
    torch): the task's v4 version (gymnasium 0.29 has no v5), its default settings on the CPU
    (``--no-cuda``), ``steps`` steps, timed: the process's wall time and the steps/s the script
    prints last (its own count since its start, setup excluded)."""
    import re
    import subprocess

    v4 = env_id.replace("-v5", "-v4")
    with tempfile.TemporaryDirectory() as root:  # its runs/ folder
        start = time.perf_counter()
        out = subprocess.run([python, str(Path(script).resolve()), "--env-id", v4, "--total-timesteps", str(steps),
                              "--no-cuda", "--seed", "1"], cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"CleanRL's script failed on {v4}:\n{out.stderr[-3000:]}")
    sps = [int(v) for v in re.findall(r"^SPS: (\d+)$", out.stdout, re.M)]
    return dict(env_id=v4, steps=steps, seconds=seconds, sps_printed=sps[-1], sps_wall=steps / seconds,
                seconds_1m_estimate=1_000_000 / sps[-1], load=os.getloadavg(),
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def time_fastppo(config: str, env_id: str, steps: int) -> dict:
    """One short run of ``config`` on ``env_id`` (seed 1, ``steps`` steps) for its steps/s, the same
    measure as CleanRL's timing: training time over the steps (setup excluded)."""
    from fastppo import train as T

    preset, changes = CONFIGS[config]
    with tempfile.TemporaryDirectory() as root:
        args = T.Args(env_id=env_id, seed=1, total_timesteps=steps, preset=preset, device="cpu", run_dir=root,
                      run_name="run", log_every=10**9, checkpoint_every=10**9, **changes(env_id))
        summary = T.train(args)
    return dict(config=config, env_id=env_id, steps=summary["global_step"], seconds=summary["seconds"],
                sps=summary["global_step"] / summary["seconds"], load=os.getloadavg(),
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def load_timings(name: str) -> dict:
    path = RUNS / name
    return json.loads(path.read_text()) if path.exists() else {}


def load_cleanrl_timings() -> dict:
    path = RUNS / "cleanrl_timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def report(runs: list) -> str:
    import platform

    import fastppo

    timings = load_cleanrl_timings()
    lines = ["# MuJoCo at 1M steps (CPU)", "",
             f"- Report written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.machine()}, "
             f"fastppo {fastppo.__version__}; each run's date, build and load average are in its JSON file.",
             "- Configurations: `mujoco` (CleanRL's ppo_continuous_action.py: 1 env x 2048 steps, 32 minibatches, 10 "
             "epochs, lr 3e-4 annealed, clip 0.2, value clipping, tanh 64-64 MLPs, orthogonal init); `mujoco-zoo` "
             "(rl-baselines3-zoo's tuned settings of each task: `fastppo.config.MUJOCO_ZOO_TASKS`); `mujoco-fast` and "
             "`mujoco-zoo-2env`: the same batch per update from 2 environments of half the steps, stepped on 2 threads "
             "(the `mujoco-fast` runs were made as `--preset mujoco --num-envs 2 --num-steps 1024`, the same "
             "settings, before the preset had its name). All: "
             "observation and reward normalization, state-independent log-std, fused policy backend.",
             "- Final return: mean of the last 10 training episodes of a seed; table: mean +- std over seeds "
             "(per seed in brackets). Evaluation: the saved policy's mean action, normalization statistics frozen, "
             "10 episodes per seed.",
             "- Published: CleanRL's 1M-step results for ppo_continuous_action.py (v4 tasks); rl-baselines3-zoo's "
             "benchmark.md for its tuned PPO (v3 tasks, 1M steps, the deterministic policy's evaluation episodes).", "",
             "| task | config | seeds | final return | evaluation return | rl-zoo | CleanRL | steps/s | wall time per run (s) "
             "| load average during runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for env_id, ref in CLEANRL_1M.items():
        zoo = ZOO_1M[env_id]
        for config in CONFIGS:
            rs = sorted((r for r in runs if r["env_id"] == env_id and r["config"] == config), key=lambda r: r["seed"])
            if not rs:
                continue
            m, s = mean_std([r["final_return"] for r in rs])
            em, es = mean_std([r["eval_mean"] for r in rs])
            per_seed = ", ".join(f"{r['final_return']:.0f}" for r in rs)
            loads = [x for r in rs for x in (r.get("load_before", [None])[0], r.get("load_after", [None])[0]) if x is not None]
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"
            lines.append(f"| {env_id} | {config} | {len(rs)} | {m:.1f} +- {s:.1f} ({per_seed}) | {em:.1f} +- {es:.1f} | "
                         f"{zoo[0]:.0f} +- {zoo[1]:.0f} | {ref} | {statistics.median(r['sps'] for r in rs):.0f} | "
                         f"{statistics.median(r['seconds'] for r in rs):.0f} | {load} |")
    ours = load_timings("fastppo_timing.json")
    if timings and ours:
        lines += ["", "## Wall time for 1M steps, from short runs timed in one sitting", "",
                  "Each configuration and CleanRL's script run the same number of steps of each task, one after the "
                  "other on the otherwise idle machine (`--time-fastppo`, `--time-cleanrl`); 1M steps at that rate, "
                  "and CleanRL's time over it.", "",
                  "| task | " + " | ".join(f"{c} (steps/s, 1M s, x CleanRL)" for c in CONFIGS) + " | CleanRL (steps/s, 1M s) |",
                  "|---|" + "---:|" * (len(CONFIGS) + 1)]
        for env_id in CLEANRL_1M:
            t = timings.get(env_id)
            if t is None:
                continue
            cells = []
            for config in CONFIGS:
                o = ours.get(f"{config} {env_id}")
                cells.append("not run" if o is None else
                             f"{o['sps']:.0f}, {1e6 / o['sps']:.0f} s, {o['sps'] / t['sps_printed']:.1f}x")
            lines.append(f"| {env_id} | " + " | ".join(cells) + f" | {t['sps_printed']}, {t['seconds_1m_estimate']:.0f} s |")
    if timings:
        lines += ["", "## CleanRL's own script, timed here", "",
                  "`ppo_continuous_action.py` (its settings, `--no-cuda`, torch's default threads), run by "
                  "`python -m benchmarks.mujoco_1m --time-cleanrl SCRIPT --cleanrl-python PY`: its last printed steps/s "
                  "over the steps run, and the 1M-step wall time that rate gives.", "",
                  "| task | steps run | wall time (s) | steps/s (printed) | 1M steps (s, from that rate) | load average |",
                  "|---|---:|---:|---:|---:|---:|"]
        for t in timings.values():
            lines.append(f"| {t['env_id']} | {t['steps']} | {t['seconds']:.0f} | {t['sps_printed']} | {t['seconds_1m_estimate']:.0f} | "
                         f"{t['load'][0]:.1f} |")
    lines += ["", "Curves: `mujoco_1m.png` (mean and min-max over seeds of the mean return of the last 100 "
              "training episodes, against steps and against wall time; the published numbers as dashed lines)."]
    return "\n".join(lines) + "\n"


def plot(runs: list, path: Path) -> None:
    """The curves of the stored runs, drawn by ``fastppo plot``'s :func:`fastppo.plot.plot_curves`: a panel per
    task, against steps (top) and wall time (bottom), CleanRL's 1M-step return as a dashed line."""
    import numpy as np

    from fastppo.plot import Curve, Reference, plot_curves

    curves = [Curve(r["env_id"], r["config"], r["seed"], *(np.array([c[i] for c in r["curve"]], np.float64) for i in range(3)))
              for e in CLEANRL_1M for r in runs if r["env_id"] == e]
    if not curves:
        return
    references = [Reference("CleanRL at 1M steps", value, env_id) for env_id, value in CLEANRL_1M.items()]
    references += [Reference("rl-zoo at 1M steps", value, env_id) for env_id, (value, _) in ZOO_1M.items()]
    plot_curves(curves, path, axes=("steps", "seconds"), references=references)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="mujoco-zoo", help="the settings of the runs")
    parser.add_argument("--env-id", choices=list(CLEANRL_1M), help="one run of this task (with --seed)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="every (task, seed) run not stored yet")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--report", action="store_true", help="write mujoco_1m.md / .png from the stored runs")
    parser.add_argument("--time-cleanrl", type=Path, metavar="SCRIPT",
                        help="time CleanRL's ppo_continuous_action.py (this path) on each task instead")
    parser.add_argument("--cleanrl-python", default=sys.executable, help="the python that runs CleanRL's script")
    parser.add_argument("--cleanrl-steps", type=int, default=100_000, help="steps of each timing run (both sides)")
    parser.add_argument("--time-fastppo", action="store_true",
                        help="time each configuration on each task for --cleanrl-steps steps instead")
    args = parser.parse_args(argv)
    if args.time_fastppo:
        timings = load_timings("fastppo_timing.json")
        for env_id in ([args.env_id] if args.env_id else list(CLEANRL_1M)):
            for config in CONFIGS:
                print(f"fastppo {config} {env_id} ...", file=sys.stderr, flush=True)
                timings[f"{config} {env_id}"] = time_fastppo(config, env_id, args.cleanrl_steps)
                print(json.dumps(timings[f"{config} {env_id}"]), flush=True)
                RUNS.mkdir(parents=True, exist_ok=True)
                (RUNS / "fastppo_timing.json").write_text(json.dumps(timings, indent=1))
        return 0
    if args.time_cleanrl:
        timings = load_cleanrl_timings()
        for env_id in ([args.env_id] if args.env_id else list(CLEANRL_1M)):
            print(f"CleanRL {env_id} ...", file=sys.stderr, flush=True)
            timings[env_id] = time_cleanrl(args.time_cleanrl, args.cleanrl_python, env_id, args.cleanrl_steps)
            print(json.dumps(timings[env_id]), flush=True)
            RUNS.mkdir(parents=True, exist_ok=True)
            (RUNS / "cleanrl_timing.json").write_text(json.dumps(timings, indent=1))
        return 0
    todo = []
    if args.env_id:
        todo.append((args.env_id, args.seed))
    if args.all:
        todo += [(e, s) for e in CLEANRL_1M for s in SEEDS if not (RUNS / args.config / f"{e}__seed{s}.json").exists()]
    for env_id, seed in todo:
        print(f"{args.config} {env_id} seed {seed} ...", file=sys.stderr, flush=True)
        r = run_one(args.config, env_id, seed, args.steps, RUNS / args.config / f"{env_id}__seed{seed}.json")
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
