"""Recurrent PPO on CartPole without velocities: ``fastppo train --recurrent lstm`` against
sb3-contrib's ``RecurrentPPO``, both with rl-baselines3-zoo's CartPoleNoVel-v1 settings, and
fastppo's feed-forward MLP on CartPole-v1 with the same sizes (the speed a recurrent run is
measured against).

    python -m benchmarks.recurrent                  # 100k steps, seeds 1-3, each contender
    python -m benchmarks.recurrent --seeds 1        # one seed
    python -m benchmarks.recurrent --threads 2      # torch.set_num_threads(2) and OMP_NUM_THREADS=2 (default 1)
    python -m benchmarks.recurrent --tiny --out-dir DIR   # seconds: checks the pipeline, measures nothing

Settings: rl-baselines3-zoo's hyperparams/ppo_lstm.yml, CartPoleNoVel-v1 (VecNormalize, 8 envs x 32
steps, batch 256, 20 epochs, gamma 0.98, lambda 0.8, lr lin_0.001, clip_range lin_0.2, ent_coef 0,
1e5 steps, ``MlpLstmPolicy`` with ortho_init False, ReLU, lstm_hidden_size 64, enable_critic_lstm,
net_arch pi [64] vf [64]): fastppo's ``--preset classic-lstm`` (what ``--preset auto`` picks for
CartPoleNoVel-v1), sb3-contrib's ``RecurrentPPO("MlpLstmPolicy", ...)`` on gymnasium's CartPole-v1
with rl-baselines3-zoo's MaskVelocityWrapper (velocities zeroed; fastppo's CartPoleNoVel-v1 leaves
them out: the same information). The MLP row is ``fastppo train --env-id CartPole-v1`` (classic-fast:
the same 8 x 32 x 20-epoch settings on the full observation, the fused policy step).

Writes ``recurrent_cpu.json`` / ``recurrent_cpu.md`` / ``recurrent_cpu.png`` (default folder
``benchmarks/results/``; ``--tiny`` writes only with ``--out-dir``): per contender and seed, steps
per second over the whole run, whether and when the mean return of the last 100 training episodes
reached 475, and the learning curves (that mean against steps and against wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

try:  # python -m benchmarks.recurrent
    from benchmarks._common import (RESULTS, machine_info, median, plot_return_curves, pyplot, sb3_return_curve,
                                    zoo_schedules)
except ImportError:  # python benchmarks/recurrent.py
    from _common import (RESULTS, machine_info, median, plot_return_curves, pyplot, sb3_return_curve,
                         zoo_schedules)

THRESHOLD = 475.0
CONTENDERS = {
    "fastppo-lstm": "fastppo train --recurrent lstm (CartPoleNoVel-v1, --preset classic-lstm)",
    "sb3-contrib": "sb3-contrib RecurrentPPO (CartPoleNoVel-v1, rl-zoo settings)",
    "fastppo-mlp": "fastppo train, MLP (CartPole-v1, --preset classic-fast)",
}
# rl-baselines3-zoo hyperparams/ppo_lstm.yml, CartPoleNoVel-v1; "lin_x" is a linear schedule from x to 0.
ZOO = dict(normalize=True, n_envs=8, n_timesteps=100_000, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
           n_epochs=20, ent_coef=0.0, learning_rate="lin_0.001", clip_range="lin_0.2",
           policy_kwargs="dict(ortho_init=False, activation_fn=nn.ReLU, lstm_hidden_size=64, enable_critic_lstm=True, "
                         "net_arch=dict(pi=[64], vf=[64]))")
TINY_STEPS = 512  # two iterations of 8 x 32


def first_reach(curve, threshold=THRESHOLD):
    """(steps, seconds) when the mean return of the last 100 episodes first reaches ``threshold``, or None."""
    for steps, seconds, ret in curve:
        if ret is not None and ret >= threshold:
            return steps, seconds
    return None


def fastppo_run(contender, seed, total, run_root):
    """One ``fastppo train`` run; SPS over the whole run (its setup apart) and the curve from its metrics."""
    from fastppo import train as T

    env_id = "CartPoleNoVel-v1" if contender == "fastppo-lstm" else "CartPole-v1"
    preset = "classic-lstm" if contender == "fastppo-lstm" else "classic-fast"
    args = T.Args(env_id=env_id, preset=preset, seed=seed, total_timesteps=total, device="cpu",
                  run_dir=str(run_root), run_name=f"{contender}-{seed}", log_every=10**9)
    start = time.perf_counter()
    summary = T.train(args)
    seconds = time.perf_counter() - start - summary["setup_seconds"]
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["global_step"], r["time"], r["episodic_return"]) for r in rows]
    last = rows[-1]
    return dict(env_id=env_id, steps=summary["global_step"], seconds=seconds, sps=summary["global_step"] / seconds,
                backend=summary["policy_backend"], final_return=summary["episodic_return"],
                time_learn=last["time_learn"], time_inference=last["time_inference"], time_env=last["time_env"],
                curve=curve)


def sb3_contrib_run(seed, total):
    """sb3-contrib's RecurrentPPO with rl-zoo's CartPoleNoVel-v1 settings; the curve is the mean of
    SB3's last 100 episodes (its Monitor's raw returns) at the end of each rollout."""
    try:
        import gymnasium as gym
        import numpy as np
        import torch
        from sb3_contrib import RecurrentPPO
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize
    except ImportError as err:
        return dict(skipped=f"sb3-contrib not installed ({err.name}; pip install sb3-contrib, in fastppo's bench extra)")

    class MaskVelocity(gym.ObservationWrapper):
        """rl-baselines3-zoo's CartPoleNoVel-v1: CartPole-v1 with the cart and pole velocities zeroed."""

        def __init__(self, env):
            super().__init__(env)
            self.mask = np.array([1.0, 0.0, 1.0, 0.0], np.float32)

        def observation(self, observation):
            return observation * self.mask

    callback, curve = sb3_return_curve()

    gym.logger.min_level = 40
    env = make_vec_env(lambda: MaskVelocity(gym.make("CartPole-v1")), n_envs=ZOO["n_envs"], seed=seed)
    env = VecNormalize(env, gamma=ZOO["gamma"])  # rl-zoo passes the algorithm's gamma to VecNormalize
    zoo = zoo_schedules(ZOO)
    model = RecurrentPPO(
        "MlpLstmPolicy", env, seed=seed, device="cpu", verbose=0, n_steps=ZOO["n_steps"], batch_size=ZOO["batch_size"],
        gae_lambda=ZOO["gae_lambda"], gamma=ZOO["gamma"], n_epochs=ZOO["n_epochs"], ent_coef=ZOO["ent_coef"],
        learning_rate=zoo["learning_rate"], clip_range=zoo["clip_range"],
        policy_kwargs=dict(ortho_init=False, activation_fn=torch.nn.ReLU, lstm_hidden_size=64, enable_critic_lstm=True,
                           net_arch=dict(pi=[64], vf=[64])))
    start = time.perf_counter()
    model.learn(total_timesteps=total, callback=callback)
    seconds = time.perf_counter() - start
    env.close()
    return dict(env_id="CartPoleNoVel-v1", steps=model.num_timesteps, seconds=seconds, sps=model.num_timesteps / seconds,
                final_return=curve[-1][2] if curve else None, curve=curve)


def run(mode, seeds, run_root):
    total = TINY_STEPS if mode == "tiny" else ZOO["n_timesteps"]
    results = []
    for seed in range(1, (1 if mode == "tiny" else seeds) + 1):
        for contender in CONTENDERS:  # alternated, so drifting machine load hits each alike
            print(f"{contender} seed {seed} ...", file=sys.stderr, flush=True)
            out = sb3_contrib_run(seed, total) if contender == "sb3-contrib" else fastppo_run(contender, seed, total,
                                                                                              run_root)
            out.update(contender=contender, seed=seed)
            if "curve" in out:
                out["reach"] = first_reach(out["curve"])
            results.append(out)
            print(f"  {json.dumps({k: v for k, v in out.items() if k != 'curve'})}", file=sys.stderr, flush=True)
    return results


def summarize(results, mode, machine, threads):
    """The Markdown report and the ratios of the issue's targets."""
    lines = [f"# Recurrent PPO: CartPole without velocities ({mode})", ""]
    if mode == "tiny":
        lines += [f"**Tiny run (--tiny): {TINY_STEPS} steps, one seed; a test of the pipeline, not a measurement.**", ""]
    lines += ["## Machine", "",
              f"- Date: {machine['date']}",
              f"- CPU: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable); "
              f"torch {machine['torch']} with {threads} thread(s), numpy {machine['numpy']}, "
              f"sb3-contrib {machine.get('sb3_contrib', 'not installed')}, fastppo {machine['fastppo']}", "",
              "## Per seed", "",
              "| contender | seed | steps | SPS | wall time (s) | mean of last 100 episodes | reached 475 at step (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {CONTENDERS[r['contender']]} | {r['seed']} | skipped: {r['skipped']} | | | | |")
            continue
        final = "-" if r["final_return"] is None else f"{r['final_return']:.1f}"
        reach = "no" if not r["reach"] else f"{r['reach'][0]} ({r['reach'][1]:.1f} s)"
        lines.append(f"| {CONTENDERS[r['contender']]} | {r['seed']} | {r['steps']} | {r['sps']:.0f} | "
                     f"{r['seconds']:.1f} | {final} | {reach} |")
    medians, reached = {}, {}
    for contender in CONTENDERS:
        rs = [r for r in results if r["contender"] == contender and "skipped" not in r]
        if rs:
            medians[contender] = median([r["sps"] for r in rs])
            reached[contender] = (sum(bool(r["reach"]) for r in rs), len(rs))
    lines += ["", "## Medians and targets (same machine, same run)", ""]
    for contender, sps in medians.items():
        lines.append(f"- {CONTENDERS[contender]}: median {sps:.0f} SPS; reached 475 on {reached[contender][0]} of "
                     f"{reached[contender][1]} seeds")
    ratios = {}
    if "fastppo-lstm" in medians and "sb3-contrib" in medians:
        ratios["lstm_vs_sb3_contrib"] = medians["fastppo-lstm"] / medians["sb3-contrib"]
        lines.append(f"- fastppo LSTM / sb3-contrib RecurrentPPO steps/s: {ratios['lstm_vs_sb3_contrib']:.2f}x "
                     "(target >= 5x)")
    if "fastppo-lstm" in medians and "fastppo-mlp" in medians:
        ratios["lstm_vs_mlp"] = medians["fastppo-lstm"] / medians["fastppo-mlp"]
        lines.append(f"- fastppo LSTM / fastppo MLP steps/s: {ratios['lstm_vs_mlp']:.2f} (target >= 0.5)")
    lines += ["", "## Notes", "",
              "- Steps per second over the whole run (fastppo: its setup apart); the mean return of the last 100 "
              "training episodes (sampled actions) after each rollout, as both trainers log it.",
              "- fastppo's recurrent update (backend `fused`, as the JSON records): minibatches of whole "
              "environments, each one C++ call of the fused actor-critic (both LSTMs over the minibatch's steps, "
              "reset at episode starts inside the time loop, heads, loss, backward through time, clip, Adam; the "
              "actor's and the critic's branches each on a thread when there are two); each rollout step is one call "
              "into it too (both LSTMs one step from the state it carries, the heads, the sampled action). "
              "sb3-contrib's: minibatches of the flattened rollout cut "
              "into padded sequences, stepped one time step at a time where a sequence starts an episode.",
              f"- torch.set_num_threads({threads}) and OMP_NUM_THREADS={threads} for every contender (--threads)."]
    return "\n".join(lines) + "\n", ratios


def plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"fastppo-lstm": "tab:blue", "sb3-contrib": "tab:orange", "fastppo-mlp": "tab:gray"}
    plot_return_curves(axes[0], axes[1], results, colors, CONTENDERS)
    for ax, xlabel in zip(axes, ("environment steps", "wall time (s)")):
        ax.axhline(THRESHOLD, color="k", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean return, last 100 episodes")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("CartPole without velocities: fastppo --recurrent lstm vs sb3-contrib RecurrentPPO (rl-zoo settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: checks that the pipeline runs")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads for every contender")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..K")
    parser.add_argument("--out-dir", type=Path, help="where the JSON, Markdown and plot go (default "
                                                     "benchmarks/results/; --tiny writes only with --out-dir)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "default"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read once, when fastppo's OpenMP runtime loads
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as run_root:
        results = run(mode, args.seeds, Path(run_root))
    machine = machine_info("cpu")
    try:
        import sb3_contrib

        machine["sb3_contrib"] = sb3_contrib.__version__
    except ImportError:
        pass
    text, ratios = summarize(results, mode, machine, args.threads)
    print(text)
    out_dir = args.out_dir or (None if args.tiny else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        document = dict(mode=mode, threads=args.threads, machine=machine, results=results, ratios=ratios,
                        settings={k: str(v) for k, v in ZOO.items()})
        (out_dir / "recurrent_cpu.json").write_text(json.dumps(document, indent=1))
        (out_dir / "recurrent_cpu.md").write_text(text)
        plot(results, out_dir / "recurrent_cpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
