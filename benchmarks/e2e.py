"""End-to-end: fastppo's trainer against the same trainer with CleanRL's eager torch computations
(``benchmarks/cleanrl_eager.py``: same envs, network, seeds and hyperparameters, torch policy, no
compilation), against stable-baselines3's PPO with its published (rl-zoo) hyperparameters where it
supports the env, and against raw EnvPool stepping with the same number of environments (the
loop's floor).

    python -m benchmarks.e2e                 # CartPole-v1 learning (3 seeds), HalfCheetah-v5 and Pong-v5 SPS
    python -m benchmarks.e2e --quick         # one seed, short budgets (a minute or two)
    python -m benchmarks.e2e --tiny --out-dir DIR   # seconds: checks the pipeline (the tests run this)

Writes ``benchmarks/results/e2e_<mode>.json`` / ``.md`` and ``learning_curves_<mode>.png``
(CartPole return against steps and against wall time). Reports steps per second over the whole
run, wall time and steps until the mean return of the last 100 episodes first reaches the
threshold (CartPole: 475). Learning quality at 1M steps (MuJoCo) is ``benchmarks/mujoco_1m.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import RESULTS, cpu_model, median, pyplot, sb3_return_curve, zoo_schedules  # python -m benchmarks.e2e
except ImportError:
    from _common import RESULTS, cpu_model, median, pyplot, sb3_return_curve, zoo_schedules  # python benchmarks/e2e.py

THRESHOLD = {"CartPole-v1": 475.0}
SB3_ZOO = {  # rl-baselines3-zoo hyperparams/ppo.yml
    "CartPole-v1": dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                        learning_rate="lin_0.001", clip_range="lin_0.2"),
}


CONTENDERS = {  # name -> (kernels, preset); None: the env's CleanRL preset
    "fastppo": ("fastppo", None),
    "fastppo-fast": ("fastppo", "classic-fast"),
    "eager": ("eager", None),
}
CLEANRL_PRESET = {"CartPole-v1": "classic", "HalfCheetah-v5": "mujoco", "Hopper-v5": "mujoco", "Walker2d-v5": "mujoco",
                  "Pong-v5": "atari", "Breakout-v5": "atari"}


def raw_env_run(env_id, num_envs, steps, seed=1):
    """Raw EnvPool stepping (sync, random actions) with `num_envs` environments: the rate no trainer
    on these environments can beat. Measured with EnvPool's default worker threads and with one
    (what the trainer uses for classic control); the faster is the floor."""
    import warnings

    import envpool
    import numpy as np

    best = None
    for threads in (None, 1):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precision lowered", category=UserWarning)
            extra = {} if threads is None else dict(num_threads=threads)
            envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, **extra)
            space = envs.action_space
        envs.reset()
        rng = np.random.default_rng(seed)
        continuous = len(space.shape) > 0
        actions = [rng.uniform(space.low, space.high, (num_envs,) + space.shape).astype(np.float32) if continuous
                   else rng.integers(0, space.n, num_envs).astype(np.int32) for _ in range(64)]
        for i in range(32):
            envs.step(actions[i % 64])
        n = max(steps // num_envs, 1)
        start = time.perf_counter()
        for i in range(n):
            envs.step(actions[i % 64])
        seconds = time.perf_counter() - start
        envs.close()
        out = dict(steps=n * num_envs, seconds=seconds, sps=n * num_envs / seconds, num_envs=num_envs,
                   env_threads=threads or "default")
        best = out if best is None or out["sps"] > best["sps"] else best
    return best


def fastppo_run(env_id, seed, total, contender, run_root):
    """One trainer run; returns SPS and the learning curve read back from its metrics file."""
    from fastppo import train as T

    kernels_name, preset = CONTENDERS[contender]
    kernels = T.Kernels()
    if kernels_name == "eager":
        try:
            from benchmarks.cleanrl_eager import EAGER
        except ImportError:
            from cleanrl_eager import EAGER
        kernels = EAGER
    args = T.Args(env_id=env_id, seed=seed, total_timesteps=total, device="cpu", run_dir=str(run_root),
                  run_name=f"{contender}-{env_id}-{seed}", log_every=10**9,
                  preset=preset or CLEANRL_PRESET.get(env_id, "auto"))
    start = time.perf_counter()
    summary = T.train(args, kernels=kernels)
    seconds = time.perf_counter() - start - summary["setup_seconds"]  # setup (compile, capture) apart
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["global_step"], r["time"], r["episodic_return"]) for r in rows if r["episodic_return"] is not None]
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    return dict(steps=summary["global_step"], seconds=seconds, sps=summary["global_step"] / seconds,
                setup_seconds=summary["setup_seconds"], backend=summary["policy_backend"], preset=config["preset"],
                num_envs=config["num_envs"], final_return=summary["episodic_return"], curve=curve)


def sb3_run(env_id, seed, total):
    """stable-baselines3 PPO with rl-zoo's hyperparameters; None when SB3 cannot run this env."""
    try:
        import gymnasium as gym
        from stable_baselines3 import PPO
        from stable_baselines3.common.env_util import make_vec_env
    except ImportError as err:
        return dict(skipped=f"stable-baselines3 not installed ({err.name})")
    if env_id not in SB3_ZOO:
        return dict(skipped="no rl-zoo hyperparameters used here for this env")
    params = zoo_schedules(SB3_ZOO[env_id])
    n_envs = params.pop("n_envs")
    callback, curve = sb3_return_curve()

    gym.logger.min_level = 40
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **params)
    start = time.perf_counter()
    model.learn(total_timesteps=total, callback=callback)
    seconds = time.perf_counter() - start
    curve = [point for point in curve if point[2] is not None]  # from the first finished episode on
    return dict(steps=model.num_timesteps, seconds=seconds, sps=model.num_timesteps / seconds,
                final_return=curve[-1][2] if curve else None, curve=curve)


def first_reach(curve, threshold):
    """(steps, seconds) when the recent mean return first reaches `threshold`, or None."""
    for steps, seconds, ret in curve:
        if ret >= threshold:
            return steps, seconds
    return None


def plan(mode):
    if mode == "tiny":  # seconds: proves the pipeline runs, measures nothing
        return [
            dict(env_id="CartPole-v1", seeds=[1], total=2_048, contenders=["fastppo", "fastppo-fast", "eager", "sb3", "raw"],
                 sb3_total=512, fast_total=1_024),
            dict(env_id="HalfCheetah-v5", seeds=[1], total=2_048, contenders=["fastppo"]),
        ]
    seeds = [1] if mode == "quick" else [1, 2, 3]
    cartpole = 200_000 if mode == "quick" else 500_000
    return [
        dict(env_id="CartPole-v1", seeds=seeds, total=cartpole, contenders=["fastppo", "fastppo-fast", "eager", "sb3", "raw"],
             sb3_total=100_000, fast_total=150_000),
        dict(env_id="HalfCheetah-v5", seeds=[1], total=10_240 if mode == "quick" else 40_960,
             contenders=["fastppo", "eager", "raw"]),
        dict(env_id="Pong-v5", seeds=[1], total=4_096 if mode == "quick" else 16_384, contenders=["fastppo", "eager", "raw"]),
    ]


def run(mode, run_root):
    results = []
    for item in plan(mode):
        for contender in item["contenders"]:
            for seed in item["seeds"]:
                print(f"{item['env_id']} {contender} seed {seed} ...", file=sys.stderr, flush=True)
                if contender == "sb3":
                    out = sb3_run(item["env_id"], seed, item.get("sb3_total", item["total"]))
                elif contender == "raw":
                    from fastppo import train as T

                    preset = T.PRESETS[CLEANRL_PRESET[item["env_id"]]]
                    out = raw_env_run(item["env_id"], preset["num_envs"], min(item["total"], 200_000), seed)
                elif contender == "fastppo-fast":
                    out = fastppo_run(item["env_id"], seed, item.get("fast_total", item["total"]), contender, run_root)
                else:
                    out = fastppo_run(item["env_id"], seed, item["total"], contender, run_root)
                out.update(env_id=item["env_id"], contender=contender, seed=seed)
                if item["env_id"] in THRESHOLD and "curve" in out:
                    out["reach"] = first_reach(out["curve"], THRESHOLD[item["env_id"]])
                results.append(out)
                print(f"  {json.dumps({k: v for k, v in out.items() if k != 'curve'})}", file=sys.stderr, flush=True)
    return results


NAMES = {"fastppo": "fastppo (CleanRL's preset)", "fastppo-fast": "fastppo (classic-fast preset)",
         "eager": "same trainer, CleanRL's eager torch ops", "sb3": "stable-baselines3 PPO (rl-zoo)",
         "raw": "raw EnvPool stepping, same env count"}


def summarize(results, mode):
    lines = [f"# End-to-end training ({mode})", "", "## Machine", ""]
    import torch

    import fastppo

    lines += [f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
              f"- CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, fastppo {fastppo.__version__}",
              f"- fastppo.build_info(): `{fastppo.build_info()}`", ""]
    lines += ["## Medians over seeds", "",
              "| env | contender | seeds | SPS | wall time (s) | setup (s) | steps to threshold | time to threshold (s) | final mean return |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in results:
        groups.setdefault((r["env_id"], r["contender"]), []).append(r)
    sps_of = {}
    for (env_id, contender), rs in groups.items():
        if any("skipped" in r for r in rs):
            lines.append(f"| {env_id} | {NAMES[contender]} | - | skipped: {rs[0]['skipped']} | | | | | |")
            continue
        sps = median([r["sps"] for r in rs])
        sps_of[env_id, contender] = sps
        reach = [r.get("reach") for r in rs]
        reached = [x for x in reach if x]
        steps = median([x[0] for x in reached]) if reached else None
        secs = median([x[1] for x in reached]) if reached else None
        thr = "-" if env_id not in THRESHOLD or contender == "raw" else (
            f"{steps:.0f}" if len(reached) == len(rs) else f"not reached ({len(reached)}/{len(rs)})")
        final = median([r.get("final_return") for r in rs])
        setup = median([r.get("setup_seconds") for r in rs])
        lines.append(f"| {env_id} | {NAMES[contender]} | {len(rs)} | {sps:.0f} | {median([r['seconds'] for r in rs]):.1f} | "
                     f"{'-' if setup is None else f'{setup:.3f}'} | {thr} | {'-' if secs is None else f'{secs:.1f}'} | "
                     f"{'-' if final is None else f'{final:.1f}'} |")
    lines += ["", "## SPS ratios (fastppo / peer, same machine, same run)", ""]
    for (env_id, contender), sps in sps_of.items():
        if contender not in ("fastppo", "fastppo-fast") and (env_id, "fastppo") in sps_of:
            lines.append(f"- {env_id}: {NAMES['fastppo']} / {NAMES[contender]} = {sps_of[env_id, 'fastppo'] / sps:.2f}")
    lines += ["", "## Targets", "", "| measure | measured | target |", "|---|---:|---:|"]

    def ratio(env_id, a, b):
        return sps_of[env_id, a] / sps_of[env_id, b] if (env_id, a) in sps_of and (env_id, b) in sps_of else None

    for env_id, label, a, b, target in (
            ("CartPole-v1", "CartPole-v1 SPS, CleanRL settings, vs the eager-ops trainer", "fastppo", "eager", ">= 3x"),
            ("CartPole-v1", "CartPole-v1 SPS vs raw EnvPool stepping, same env count", "fastppo", "raw", ">= 50%"),
            ("HalfCheetah-v5", "HalfCheetah-v5 SPS, CleanRL settings, vs the eager-ops trainer", "fastppo", "eager", ">= 2.5x"),
            ("HalfCheetah-v5", "HalfCheetah-v5 SPS vs raw EnvPool stepping, same env count", "fastppo", "raw", "-"),
            ("Pong-v5", "Pong-v5 SPS vs the eager-ops trainer (CPU)", "fastppo", "eager", ">= 1.3x")):
        r = ratio(env_id, a, b)
        if r is not None:
            shown = f"{100 * r:.0f}%" if b == "raw" else f"{r:.2f}x"
            lines.append(f"| {label} | {shown} | {target} |")
    fast = [r.get("reach") for r in groups.get(("CartPole-v1", "fastppo-fast"), [])]
    sb3 = [r.get("reach") for r in groups.get(("CartPole-v1", "sb3"), []) if "skipped" not in r]
    if fast and sb3 and all(sb3):
        sb3_time = median([x[1] for x in sb3])
        per_seed = ", ".join("not reached" if x is None else f"{x[1] / sb3_time:.2f}x" for x in fast)
        lines.append(f"| CartPole-v1 wall time to 475, classic-fast preset vs SB3 rl-zoo (median {sb3_time:.1f} s), "
                     f"per seed | {per_seed} | <= 0.5x, all seeds |")
    lines += ["", "## Notes", "",
              "- SPS counts environment steps over the whole run (rollout and learning), on the CPU; setup (building the "
              "fused policy, compiling, capturing) is excluded from SPS and shown apart. fastppo picks its policy backend "
              "with --policy-backend auto: fused (one C++ call per rollout step and per minibatch) for the MLP presets, "
              "torch for Atari's CNN.",
              "- Raw EnvPool stepping: sync steps with random actions and the CleanRL preset's env count, nothing else; "
              "the faster of EnvPool's default worker threads and one thread.",
              "- Threshold: the mean return of the last 100 episodes (CartPole-v1: 475); SB3's from its episode buffer "
              "(last 100 episodes), read at the end of each rollout.",
              "- The eager baseline is fastppo's trainer with fastppo.gae, fastppo.ppo_loss and the fused heads replaced by "
              "CleanRL's loop, CleanRL's loss lines and torch.distributions; nothing else differs.",
              "- SB3 runs its own gymnasium vector env (rl-zoo: 8 envs x 32 steps for CartPole); it is not run on "
              "HalfCheetah or Pong here (no rl-zoo settings wired up, and Atari needs ale-py)."]
    return "\n".join(lines) + "\n"


def plot(results, path):
    plt = pyplot()
    curves = [r for r in results if r["env_id"] == "CartPole-v1" and r.get("curve")]
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"fastppo": "tab:blue", "fastppo-fast": "tab:purple", "eager": "tab:orange", "sb3": "tab:green"}
    for r in curves:
        steps, secs, rets = zip(*r["curve"])
        label = f"{NAMES[r['contender']]} (seed {r['seed']})"
        axes[0].plot(steps, rets, color=colors[r["contender"]], alpha=0.8, label=label)
        axes[1].plot(secs, rets, color=colors[r["contender"]], alpha=0.8, label=label)
    for ax, xlabel in zip(axes, ("environment steps", "wall time (s)")):
        ax.axhline(THRESHOLD["CartPole-v1"], color="gray", linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean return (last 100 episodes)")
        ax.grid(alpha=0.3)
    axes[0].set_title("CartPole-v1: return vs steps")
    axes[1].set_title("CartPole-v1: return vs wall time")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="one seed, short budgets")
    group.add_argument("--tiny", action="store_true", help="seconds: checks that the pipeline runs (used by the tests)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON, Markdown and plot go")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "tiny" if args.tiny else "default"
    with tempfile.TemporaryDirectory() as run_root:
        results = run(mode, run_root)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"e2e_{mode}.json").write_text(json.dumps(results))
    text = summarize(results, mode)
    (args.out_dir / f"e2e_{mode}.md").write_text(text)
    plot(results, args.out_dir / f"learning_curves_{mode}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
