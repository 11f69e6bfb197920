"""stable-baselines3's PPO against ``fastppo.sb3.PPO`` (the same class with fastppo's GAE, loss and
policy heads): same settings, seeds, environments and policy network, run alternately in one process.

    python -m benchmarks.bench_sb3                    # CartPole-v1 100k steps, HalfCheetah-v5 50k steps; 3 seeds
    python -m benchmarks.bench_sb3 --threads 2        # torch.set_num_threads(2) and OMP_NUM_THREADS=2 (default 1)
    python -m benchmarks.bench_sb3 --tiny --out-dir DIR   # seconds: checks the pipeline (the tests run this)

Settings are rl-baselines3-zoo's (hyperparams/ppo.yml): CartPole-v1 as tuned there (8 envs x 32
steps, linear schedules), HalfCheetah with its tuned HalfCheetah-v3 entry applied to v5 (VecNormalize,
1 env x 512 steps, 20 epochs, 256x256 ReLU networks). HalfCheetah needs MuJoCo
(``pip install 'gymnasium[mujoco]'``, in fastppo's ``bench`` extra); without it that row says so.

Writes ``sb3_cpu.json`` / ``sb3_cpu.md`` (default folder ``benchmarks/results/``; ``--tiny`` writes
only with ``--out-dir``). Per contender, medians over seeds of steps per second over the whole
``learn()``, wall time, the time spent in ``train()`` (the part fastppo replaces; rollout collection
is SB3's own in both) and the final mean return of the last 100 episodes; and the ratios
fastppo.sb3 / SB3 from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:  # python -m benchmarks.bench_sb3
    from benchmarks._common import RESULTS, machine_info, median, zoo_schedules
except ImportError:  # python benchmarks/bench_sb3.py
    from _common import RESULTS, machine_info, median, zoo_schedules

CONTENDERS = {"sb3": "stable-baselines3 PPO", "fastppo.sb3": "fastppo.sb3.PPO"}

# rl-baselines3-zoo hyperparams/ppo.yml; "lin_x" is a linear schedule from x to 0.
ZOO = {
    "CartPole-v1": dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                        learning_rate="lin_0.001", clip_range="lin_0.2"),
    "HalfCheetah-v5": dict(normalize=True, n_envs=1, batch_size=64, n_steps=512, gamma=0.98, learning_rate=2.0633e-05,
                           ent_coef=0.000401762, clip_range=0.1, n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8,
                           vf_coef=0.58096, policy_kwargs="mujoco"),
}
TINY_STEPS = {"CartPole-v1": 512, "HalfCheetah-v5": 512}  # two CartPole iterations, one HalfCheetah iteration


def plan(mode, seeds=3):
    if mode == "tiny":  # seconds: proves the pipeline runs, measures nothing
        return [dict(env_id=env_id, seeds=[1], total=steps) for env_id, steps in TINY_STEPS.items()]
    return [dict(env_id="CartPole-v1", seeds=list(range(1, seeds + 1)), total=100_000),
            dict(env_id="HalfCheetah-v5", seeds=list(range(1, seeds + 1)), total=50_000)]


def missing_requirement(env_id):
    """Why this env cannot run here, or None."""
    if env_id.startswith("HalfCheetah"):
        try:
            import mujoco  # noqa: F401
        except ImportError:
            return "MuJoCo is not installed (pip install 'gymnasium[mujoco]', part of fastppo's bench extra)"
    return None


def model_kwargs(env_id):
    """(n_envs, normalize, PPO keyword arguments) from the zoo entry."""
    import torch

    params = zoo_schedules(ZOO[env_id])
    n_envs, normalize = params.pop("n_envs"), params.pop("normalize", False)
    if params.get("policy_kwargs") == "mujoco":  # the zoo's tuned MuJoCo network
        params["policy_kwargs"] = dict(log_std_init=-2, ortho_init=False, activation_fn=torch.nn.ReLU,
                                       net_arch=dict(pi=[256, 256], vf=[256, 256]))
    return n_envs, normalize, params


def one_run(contender, env_id, seed, total):
    """One learn() of `total` steps; returns its timings and final mean return."""
    import gymnasium as gym
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    import fastppo
    from fastppo.sb3 import PPO as FastPPO

    fastppo.ppo_loss, fastppo.categorical_logprob_entropy  # load the torch ops before any clock starts, as SB3's are
    gym.logger.min_level = 40
    n_envs, normalize, params = model_kwargs(env_id)
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if normalize:
        env = VecNormalize(env, gamma=params["gamma"])
    cls = FastPPO if contender == "fastppo.sb3" else SB3PPO
    model = cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **params)
    train_seconds = []
    train = model.train

    def timed_train():
        start = time.perf_counter()
        train()
        train_seconds.append(time.perf_counter() - start)

    model.train = timed_train
    start = time.perf_counter()
    model.learn(total_timesteps=total)
    seconds = time.perf_counter() - start
    returns = [info["r"] for info in model.ep_info_buffer]
    env.close()
    return dict(steps=model.num_timesteps, seconds=seconds, sps=model.num_timesteps / seconds,
                train_seconds=sum(train_seconds), iterations=len(train_seconds), episodes=len(returns),
                final_return=sum(returns) / len(returns) if returns else None)


def run(mode, seeds=3):
    results = []
    for item in plan(mode, seeds):
        reason = missing_requirement(item["env_id"])
        for seed in item["seeds"]:
            for contender in CONTENDERS:  # alternated, so drifting machine load hits both alike
                print(f"{item['env_id']} {contender} seed {seed} ...", file=sys.stderr, flush=True)
                out = dict(skipped=reason) if reason else one_run(contender, item["env_id"], seed, item["total"])
                out.update(env_id=item["env_id"], contender=contender, seed=seed)
                results.append(out)
                print(f"  {json.dumps(out)}", file=sys.stderr, flush=True)
    return results


def summarize(results, mode, machine, threads):
    """The Markdown report and the per-env ratios."""
    lines = [f"# stable-baselines3 PPO vs fastppo.sb3.PPO ({mode})", ""]
    if mode == "tiny":
        lines += ["**Tiny run (--tiny): a few hundred steps per env, one seed; a test of the pipeline, not a "
                  "measurement.**", ""]
    lines += ["## Machine", "",
              f"- Date: {machine['date']}",
              f"- CPU: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable); "
              f"torch {machine['torch']} with {threads} thread(s), numpy {machine['numpy']}, "
              f"stable-baselines3 {machine['stable_baselines3']}, fastppo {machine['fastppo']}",
              f"- fastppo.build_info(): `{machine['fastppo_build_info']}`", "",
              "## Medians over seeds", "",
              "| env | contender | seeds | SPS | wall time (s) | train() time (s) | final mean return |",
              "|---|---|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in results:
        groups.setdefault(r["env_id"], {}).setdefault(r["contender"], []).append(r)
    ratios = {}
    for env_id, by_contender in groups.items():
        medians = {}
        for contender, rs in by_contender.items():
            if any("skipped" in r for r in rs):
                lines.append(f"| {env_id} | {CONTENDERS[contender]} | - | skipped: {rs[0]['skipped']} | | | |")
                continue
            m = {key: median([r[key] for r in rs]) for key in ("sps", "seconds", "train_seconds", "final_return")}
            medians[contender] = m
            final = "-" if m["final_return"] is None else f"{m['final_return']:.1f}"
            lines.append(f"| {env_id} | {CONTENDERS[contender]} | {len(rs)} | {m['sps']:.0f} | {m['seconds']:.1f} | "
                         f"{m['train_seconds']:.1f} | {final} |")
        if len(medians) == 2:
            ours, peer = medians["fastppo.sb3"], medians["sb3"]
            ratios[env_id] = dict(sps=ours["sps"] / peer["sps"],
                                  train_speedup=peer["train_seconds"] / ours["train_seconds"])
    lines += ["", "## Ratios (same machine, same run)", ""]
    for env_id, r in ratios.items():
        lines.append(f"- {env_id}: SPS fastppo.sb3 / SB3 = {r['sps']:.2f}; train() time SB3 / fastppo.sb3 = "
                     f"{r['train_speedup']:.2f}")
    lines += ["", "## Notes", "",
              "- Both contenders are the same SB3 algorithm: fastppo.sb3.PPO subclasses stable_baselines3.PPO and "
              "replaces GAE (fastppo.gae) and train() (fastppo.ppo_loss, fused categorical / Gaussian heads). Rollout "
              "collection, the environments and the networks are SB3's in both, so SPS gains are bounded by the "
              "share of time spent in train().",
              "- With the same seed both see the same first rollout; the updates then agree to float32 rounding, so "
              "later rollouts can drift apart and final returns differ within seed noise.",
              "- SPS counts environment steps over the whole learn() call; train() time is the sum over iterations.",
              "- Final mean return: SB3's episode buffer (last 100 episodes, raw rewards from the Monitor wrapper) at "
              "the end of learn().",
              f"- torch.set_num_threads({threads}) and OMP_NUM_THREADS={threads} for both contenders (--threads)."]
    return "\n".join(lines) + "\n", ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="seconds: checks that the pipeline runs (used by the tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads for both contenders")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per task (1..K)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default benchmarks/results/; "
                                                     "--tiny writes only with --out-dir)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "default"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read once, when fastppo's OpenMP runtime loads
    import stable_baselines3
    import torch

    torch.set_num_threads(args.threads)
    results = run(mode, args.seeds)
    machine = dict(machine_info("cpu"), stable_baselines3=stable_baselines3.__version__)
    text, ratios = summarize(results, mode, machine, args.threads)
    print(text)
    out_dir = args.out_dir or (None if args.tiny else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        document = dict(mode=mode, threads=args.threads, machine=machine, results=results, ratios=ratios,
                        settings={env_id: {k: str(v) for k, v in ZOO[env_id].items()} for env_id in ZOO})
        (out_dir / "sb3_cpu.json").write_text(json.dumps(document, indent=1))
        (out_dir / "sb3_cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
