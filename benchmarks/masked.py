"""Masked PPO on sb3-contrib's own masked tasks: ``fastppo train`` (action masks read from the
environments' ``action_masks()``) against sb3-contrib's ``MaskablePPO``, same hyperparameters, same
registered gymnasium tasks (``benchmarks/masked_envs.py``: ``InvalidActionEnvDiscrete(dim=70,
n_invalid_actions=55)`` and ``InvalidActionEnvMultiDiscrete(dims=[2, 3], n_invalid_actions=1)``,
the sizes of sb3-contrib's tests, with one-hot observations).

    python -m benchmarks.masked                    # both tasks, seeds 1-3, both trainers: masked_cpu.json/.md/.png
    python -m benchmarks.masked --seeds 1          # one seed
    python -m benchmarks.masked --tasks InvalidActionDiscrete-v0
    python -m benchmarks.masked --threads 1        # torch.set_num_threads(1) and OMP_NUM_THREADS=1 for both sides
    python -m benchmarks.masked --fastppo-threads default --sb3-threads 1   # each side's own setting
    python -m benchmarks.masked --tiny --out-dir DIR   # seconds: checks the pipeline, measures nothing

Every run (a trainer, a task, a seed) is its own process, started one at a time after the last
one ended, with its thread setting: ``1`` (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) or
``default`` (torch's own default, ``OMP_NUM_THREADS`` unset). The default of each side is the
faster of the two in a smoke run on a 2-core machine (:data:`THREADS`). Per task the runs alternate
fastppo, MaskablePPO, seed after seed, so drifting machine load hits both alike; before them, this
process times the environments alone (random actions, masks read each step, fastppo's vector env).

Settings (:data:`SETTINGS`): MaskablePPO's defaults with the discount of sb3-contrib's learning
test (``gamma=0.4``), 8 environments: 8 x 256 steps per rollout (the default 2048), minibatches of
64, 10 epochs, lr 3e-4 constant, lambda 0.95, clip 0.2 constant, no value clipping, ent_coef 0,
vf_coef 0.5 (SB3's ``mean((R - v)^2)``; fastppo's value loss is CleanRL's ``0.5 * mean((R - v)^2)``,
so it gets ``--vf-coef 1.0``: the same loss), gradient-norm clip 0.5, advantages normalized per
minibatch, Adam eps 1e-5, actor and critic each 64-64 tanh with orthogonal initialization, no
observation or reward normalization, 102,400 steps (50 rollouts).

Reports per task, trainer and seed: steps per second over MaskablePPO's ``learn`` and over fastppo's
training loop (building the model and the evaluation apart), the mean return of the last 100 training episodes (sampled
actions) at the end, and the mean return of a deterministic evaluation (the most probable legal
action, 20 episodes, evaluation seed 12345) of the final policy. The tasks' episodes last 100
steps and pay 1 per correct action: 100 is the most, and sb3-contrib's test calls the Discrete task
learned at a mean evaluation return of 90 (:data:`SOLVED`). Writes ``masked_cpu.json`` /
``masked_cpu.md`` / ``masked_cpu.png`` (default folder ``benchmarks/results/``; ``--tiny`` writes
only with ``--out-dir``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/masked.py: the tasks' module is benchmarks.masked_envs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import (RESULTS, machine_head, machine_info, median, plot_return_curves, pyplot,  # noqa: E402
                                sb3_return_curve)

ROOT = Path(__file__).resolve().parents[1]
ENV_MODULE = "benchmarks.masked_envs"
TASKS = ("InvalidActionDiscrete-v0", "InvalidActionMultiDiscrete-v0")
CONTENDERS = {
    "fastppo": "fastppo train (masks from action_masks())",
    "sb3-contrib": "sb3-contrib MaskablePPO",
}
# The thread setting of each side when --threads / --fastppo-threads / --sb3-threads leave it unset:
# the faster of 1 and torch's default in a smoke run (2-core VM, 20k steps per run, both tasks).
THREADS = {"fastppo": "1", "sb3-contrib": "1"}
SETTINGS = dict(n_envs=8, n_steps=256, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.4, gae_lambda=0.95,
                clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, total_timesteps=102_400)  # 50 rollouts
TINY = dict(SETTINGS, n_steps=64, total_timesteps=1024)  # two 8 x 64 rollouts: one episode per environment
EVAL_EPISODES, TINY_EVAL_EPISODES, EVAL_SEED = 20, 2, 12345
SOLVED = 90.0  # sb3-contrib's tests/test_invalid_actions.py: evaluate_policy(..., reward_threshold=90)
ENV_ONLY_STEPS = {"default": 20_000, "tiny": 512}


def task_id(task):
    """The id both trainers make: gymnasium imports ENV_MODULE (which registers the task) first."""
    return f"{ENV_MODULE}:{task}"


def fastppo_run(task, seed, settings, eval_episodes, run_root):
    """One ``fastppo train`` run with ``settings`` (SB3's names) and its deterministic evaluation."""
    from fastppo import train as T
    from fastppo.evaluate import evaluate

    s = settings
    args = T.Args(env_id=task_id(task), preset="classic", seed=seed, total_timesteps=s["total_timesteps"],
                  learning_rate=s["learning_rate"], anneal_lr=False, num_envs=s["n_envs"], num_steps=s["n_steps"],
                  num_minibatches=s["n_envs"] * s["n_steps"] // s["batch_size"], update_epochs=s["n_epochs"],
                  gamma=s["gamma"], gae_lambda=s["gae_lambda"], clip_coef=s["clip_range"], anneal_clip=False,
                  clip_vloss=False, ent_coef=s["ent_coef"], vf_coef=2.0 * s["vf_coef"],  # SB3's value loss has no 0.5
                  max_grad_norm=s["max_grad_norm"], norm_adv=True, action_masks="on", device="cpu",
                  run_dir=str(run_root), run_name=f"fastppo-{task}-{seed}", log_every=10**9, checkpoint_every=10**9)
    start = time.perf_counter()
    summary = T.train(args)
    train_seconds = time.perf_counter() - start
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = rows[-1]["time"]  # the training loop: rollouts and updates (setup and the last checkpoint apart)
    evaluation = evaluate(str(run_dir), episodes=eval_episodes, seed=EVAL_SEED)
    return dict(steps=summary["global_step"], seconds=seconds, sps=summary["global_step"] / seconds,
                train_seconds=train_seconds,
                backend=summary["policy_backend"], final_return=summary["episodic_return"],
                eval_return=evaluation["mean_return"], eval_std=evaluation["std_return"],
                curve=[(r["global_step"], r["time"], r["episodic_return"]) for r in rows])


def sb3_contrib_run(task, seed, settings, eval_episodes):
    """sb3-contrib's MaskablePPO with ``settings`` on the same registered task (SB3's Monitor and
    DummyVecEnv), and its deterministic masked evaluation; the curve is the mean of SB3's last 100
    episodes at the end of each rollout."""
    import numpy as np
    import torch
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.evaluation import evaluate_policy
    from stable_baselines3.common.env_util import make_vec_env

    s = settings
    env = make_vec_env(task_id(task), n_envs=s["n_envs"], seed=seed)
    model = MaskablePPO(
        "MlpPolicy", env, seed=seed, device="cpu", verbose=0, n_steps=s["n_steps"], batch_size=s["batch_size"],
        n_epochs=s["n_epochs"], learning_rate=s["learning_rate"], gamma=s["gamma"], gae_lambda=s["gae_lambda"],
        clip_range=s["clip_range"], ent_coef=s["ent_coef"], vf_coef=s["vf_coef"], max_grad_norm=s["max_grad_norm"],
        normalize_advantage=True,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh, ortho_init=True))
    callback, curve = sb3_return_curve()
    start = time.perf_counter()
    model.learn(total_timesteps=s["total_timesteps"], callback=callback)
    seconds = time.perf_counter() - start
    env.close()
    eval_env = make_vec_env(task_id(task), n_envs=1, seed=EVAL_SEED)
    rewards, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True, warn=False,
                                 return_episode_rewards=True)
    eval_env.close()
    return dict(steps=model.num_timesteps, seconds=seconds, sps=model.num_timesteps / seconds,
                final_return=curve[-1][2] if curve else None, eval_return=float(sum(rewards) / len(rewards)),
                eval_std=float(np.std(rewards)), curve=curve)


def env_only_run(task, seed, settings, steps):
    """The environments alone, as fastppo steps them (gymnasium's sync vector env, next-step
    autoreset, ``n_envs``): random actions (the tasks do not check legality), each step's masks
    read through ``action_masks()``. The most either trainer's steps/s could be."""
    import gymnasium as gym
    import numpy as np

    envs = gym.make_vec(task_id(task), num_envs=settings["n_envs"], vectorization_mode="sync",
                        vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP))
    envs.action_space.seed(seed)
    envs.reset(seed=seed)
    rounds = max(steps // settings["n_envs"], 1)
    start = time.perf_counter()
    for _ in range(rounds):
        np.stack([np.ravel(m) for m in envs.call("action_masks")])
        envs.step(envs.action_space.sample())
    seconds = time.perf_counter() - start
    envs.close()
    return dict(steps=rounds * settings["n_envs"], seconds=seconds, sps=rounds * settings["n_envs"] / seconds)


def settings_of(mode, total_timesteps=None):
    """The hyperparameters of a run mode, with ``total_timesteps`` when given, rounded up to whole
    rollouts (``n_envs * n_steps``): MaskablePPO would finish its last rollout, fastppo would drop it."""
    settings = dict(TINY if mode == "tiny" else SETTINGS)
    rollout = settings["n_envs"] * settings["n_steps"]
    total = settings["total_timesteps"] if total_timesteps is None else total_timesteps
    settings["total_timesteps"] = -(-total // rollout) * rollout
    return settings


def one_run(contender, task, seed, mode, total_timesteps=None):
    """The run a child process makes (``--run``): its thread setting is already in place."""
    settings = settings_of(mode, total_timesteps)
    episodes = TINY_EVAL_EPISODES if mode == "tiny" else EVAL_EPISODES
    if contender == "sb3-contrib":
        return sb3_contrib_run(task, seed, settings, episodes)
    with tempfile.TemporaryDirectory() as run_root:
        return fastppo_run(task, seed, settings, episodes, Path(run_root))


def thread_env(threads):
    """The child's environment for a thread setting: OMP_NUM_THREADS the count (torch's OpenMP and
    fastppo's thread runtime, either of them, read it), unset for ``"default"``; FASTPPO_NUM_THREADS
    unset, so that one count holds for both libraries."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("FASTPPO_NUM_THREADS", None)
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    return env


def spawn(contender, task, seed, mode, threads, total_timesteps, out_dir):
    """One run in a fresh process (``python -m benchmarks.masked --run ...``), waited for; its result dict."""
    result = Path(out_dir) / f"{contender}-{task}-{seed}.json"
    command = [sys.executable, "-m", "benchmarks.masked", "--run", contender, task, str(seed), "--threads", threads,
               "--total-timesteps", str(total_timesteps), "--result", str(result)]
    proc = subprocess.run(command + (["--tiny"] if mode == "tiny" else []), cwd=ROOT, env=thread_env(threads),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        return dict(failed=f"exit {proc.returncode}: {last}", stderr=proc.stderr[-4000:])
    return json.loads(result.read_text())


def run(mode, seeds, tasks, threads, total_timesteps):
    """Per task: the environments alone (in this process), then each seed's fastppo and MaskablePPO
    runs, each in its own process."""
    settings = settings_of(mode, total_timesteps)
    seeds = range(1, (1 if mode == "tiny" else seeds) + 1)
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for task in tasks:
            for contender, seed in [("env-only", 1)] + [(c, seed) for seed in seeds for c in CONTENDERS]:
                print(f"{task} {contender} seed {seed} ...", file=sys.stderr, flush=True)
                if contender == "env-only":
                    out, side = env_only_run(task, seed, settings, ENV_ONLY_STEPS[mode]), "-"
                else:
                    side = threads[contender]
                    out = spawn(contender, task, seed, mode, side, settings["total_timesteps"], out_dir)
                out.update(task=task, contender=contender, seed=seed, threads=side)
                results.append(out)
                print(f"  {json.dumps({k: v for k, v in out.items() if k not in ('curve', 'stderr')})}",
                      file=sys.stderr, flush=True)
    return results


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def summarize(results, mode, machine, threads, settings):
    """The Markdown report and, per task, the medians and the ratio of the issue's target."""
    lines = [f"# Masked PPO: fastppo vs sb3-contrib MaskablePPO ({mode})", ""]
    if mode == "tiny":
        lines += [f"**Tiny run (--tiny): {settings['total_timesteps']} steps, one seed; a test of the pipeline, "
                  "not a measurement.**", ""]
    lines += ["## Machine", ""] + machine_head(machine, versions=f"stable-baselines3 {machine.get('sb3', '-')}, "
                                               f"sb3-contrib {machine.get('sb3_contrib', '-')}, ")
    lines += ["", "## Per run", "",
              "| task | trainer | seed | torch threads | steps | wall time (s) | steps/s | mean of last 100 training "
              "episodes | deterministic evaluation |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        name = "environments alone" if r["contender"] == "env-only" else CONTENDERS[r["contender"]]
        if "failed" in r:
            lines.append(f"| {r['task']} | {name} | {r['seed']} | {r['threads']} | failed: {r['failed']} | | | | |")
            continue
        evaluation = "" if "eval_return" not in r else f"{r['eval_return']:.1f} +- {r['eval_std']:.1f}"
        lines.append(f"| {r['task']} | {name} | {r['seed']} | {r['threads']} | {r['steps']} | {r['seconds']:.1f} | "
                     f"{r['sps']:.0f} | {fmt(r.get('final_return'))} | {evaluation} |")
    lines += ["", "## Medians over seeds and the target (same machine, same run)", "",
              "| task | trainer | seeds | steps/s | wall time (s) | mean of last 100 training episodes | "
              f"deterministic evaluation | seeds with evaluation >= {SOLVED:.0f} |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    ratios, targets = {}, []
    for task in dict.fromkeys(r["task"] for r in results):
        medians, returns = {}, {}
        for contender in ("env-only", *CONTENDERS):
            rs = [r for r in results if r["task"] == task and r["contender"] == contender and "failed" not in r]
            if not rs:
                continue
            medians[contender] = median([r["sps"] for r in rs])
            name = "environments alone" if contender == "env-only" else CONTENDERS[contender]
            if contender == "env-only":
                lines.append(f"| {task} | {name} | - | {medians[contender]:.0f} | | | | |")
                continue
            solved = sum(r["eval_return"] >= SOLVED for r in rs)
            returns[contender] = (median([r["final_return"] for r in rs]), median([r["eval_return"] for r in rs]))
            lines.append(f"| {task} | {name} | {len(rs)} | {medians[contender]:.0f} | "
                         f"{median([r['seconds'] for r in rs]):.1f} | {fmt(median([r['final_return'] for r in rs]))} | "
                         f"{fmt(median([r['eval_return'] for r in rs]))} | {solved} of {len(rs)} |")
        if "fastppo" in medians and "sb3-contrib" in medians:
            ratios[task] = medians["fastppo"] / medians["sb3-contrib"]
            (ours, ours_eval), (peer, peer_eval) = returns["fastppo"], returns["sb3-contrib"]
            targets.append(f"- {task}: fastppo / MaskablePPO steps/s {ratios[task]:.2f}x (target >= 3x); mean of the "
                           f"last 100 training episodes {fmt(ours)} vs {fmt(peer)}, deterministic evaluation "
                           f"{fmt(ours_eval)} vs {fmt(peer_eval)} (target: the same; medians over seeds)")
    lines += [""] + targets
    s, episodes = settings, TINY_EVAL_EPISODES if mode == "tiny" else EVAL_EPISODES
    lines += ["", "## Settings", "",
              f"- Both trainers: {s['n_envs']} environments x {s['n_steps']} steps per rollout, minibatches of "
              f"{s['batch_size']}, {s['n_epochs']} epochs, lr {s['learning_rate']:g} (constant), gamma {s['gamma']:g}, "
              f"lambda {s['gae_lambda']:g}, clip {s['clip_range']:g} (constant, no value clipping), ent_coef "
              f"{s['ent_coef']:g}, vf_coef {s['vf_coef']:g} on SB3's `mean((R - v)^2)` (fastppo: --vf-coef "
              f"{2 * s['vf_coef']:g} on its `0.5 * mean((R - v)^2)`, the same loss), gradient-norm clip "
              f"{s['max_grad_norm']:g}, advantages normalized per minibatch, Adam eps 1e-5, actor and critic each "
              f"64-64 tanh (orthogonal initialization), no normalization, {s['total_timesteps']} steps: "
              "MaskablePPO's defaults with the discount of sb3-contrib's learning test (gamma 0.4), on several "
              "environments.",
              f"- Torch threads: fastppo {threads['fastppo']}, MaskablePPO {threads['sb3-contrib']} (`1`: "
              "torch.set_num_threads(1) and OMP_NUM_THREADS=1; `default`: torch's default, OMP_NUM_THREADS unset); "
              "each run its own process, one at a time.",
              "", "## Notes", "",
              "- Tasks: sb3-contrib's `InvalidActionEnvDiscrete(dim=70, n_invalid_actions=55)` (the size of its "
              "learning test) and `InvalidActionEnvMultiDiscrete(dims=[2, 3], n_invalid_actions=1)` (the size of its "
              "MultiDiscrete test), registered by `benchmarks/masked_envs.py` with one-hot observations (what SB3's "
              "policies make of a Discrete / MultiDiscrete observation); 100 steps per episode, 1 per correct action. "
              "A uniform legal choice earns about 6.7 (Discrete) and 25 (MultiDiscrete); sb3-contrib's test calls the "
              f"Discrete task learned at a mean evaluation return of {SOLVED:.0f}.",
              "- Both read the legal actions from the environments' `action_masks()` at every step and sample, and "
              "score in the update, under them. fastppo runs the backend its `--policy-backend auto` picks, the fused "
              "actor-critic (one C++ call per step and one per minibatch, the masks inside them); MaskablePPO its "
              "MaskableActorCriticPolicy on SB3's DummyVecEnv.",
              "- Steps/s: environment steps over MaskablePPO's `learn` (model construction apart) or over fastppo's "
              "training loop (rollouts and updates: the time of its last logged iteration; building the environments "
              "and the policy, and the final checkpoint, apart); the evaluation apart. fastppo's steps include the "
              "one reset step that ends each episode under next-step autoreset (1 in 101); MaskablePPO's vector env "
              "resets within the last step.",
              "- Final return: the mean of the last 100 training episodes (sampled actions), as both trainers log it; "
              f"deterministic evaluation: the most probable legal action, {episodes} episodes, seed {EVAL_SEED} "
              "(fastppo's `evaluate`, sb3-contrib's maskable `evaluate_policy`).",
              "- The environments alone: gymnasium's sync vector env stepped with random actions, masks read each "
              "step: an upper bound of either trainer's steps/s (the tasks' own Python, mostly `action_masks()`)."]
    return "\n".join(lines) + "\n", ratios


def plot(results, path):
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    colors = {"fastppo": "tab:blue", "sb3-contrib": "tab:orange"}
    for row, task in zip(axes, tasks):
        plot_return_curves(row[0], row[1], [r for r in results if r["task"] == task], colors, CONTENDERS,
                           marker=".", markersize=3)
        for ax, xlabel in zip(row, ("environment steps", "wall time (s)")):
            ax.axhline(SOLVED, color="k", lw=0.8, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean return, last 100 episodes")
            ax.set_ylim(0, 105)  # 100 per episode at most
            ax.set_title(task, fontsize=10)
        if row[0].get_legend_handles_labels()[0]:
            row[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("sb3-contrib's masked tasks: fastppo train vs MaskablePPO, same hyperparameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def threads_arg(value):
    if value == "default" or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"expected a thread count >= 1 or 'default', got {value!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: checks that the pipeline runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..K")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tasks to run")
    parser.add_argument("--threads", type=threads_arg, help="torch threads of both sides: a count, or 'default' "
                        "(torch's, OMP_NUM_THREADS unset); unset: each side's THREADS")
    parser.add_argument("--fastppo-threads", type=threads_arg, help="fastppo's thread setting (overrides --threads)")
    parser.add_argument("--sb3-threads", type=threads_arg, help="MaskablePPO's thread setting (overrides --threads)")
    parser.add_argument("--total-timesteps", type=int, help=f"steps of each training run (default "
                        f"{SETTINGS['total_timesteps']}; --tiny {TINY['total_timesteps']})")
    parser.add_argument("--out-dir", type=Path, help="where the JSON, Markdown and plot go (default "
                                                     "benchmarks/results/; --tiny writes only with --out-dir)")
    parser.add_argument("--run", nargs=3, metavar=("CONTENDER", "TASK", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        parser.error(f"--total-timesteps must be >= 1, got {args.total_timesteps}")
    mode = "tiny" if args.tiny else "default"
    if args.run:  # a child: one run, its thread setting in OMP_NUM_THREADS already
        import torch

        if args.threads not in (None, "default"):
            torch.set_num_threads(int(args.threads))
        contender, task, seed = args.run
        out = one_run(contender, task, int(seed), mode, args.total_timesteps)
        out["torch_threads"] = torch.get_num_threads()
        if contender == "fastppo":  # its threads as this process runs them
            import fastppo

            out["build_info"] = fastppo.build_info()
        args.result.write_text(json.dumps(out))
        return 0

    threads = {side: getattr(args, f"{flag}_threads") or args.threads or THREADS[side]
               for side, flag in (("fastppo", "fastppo"), ("sb3-contrib", "sb3"))}
    if importlib.util.find_spec("sb3_contrib") is None:  # its tasks as much as its trainer
        sys.exit("error: the masked benchmark needs sb3-contrib (its tasks and MaskablePPO): pip install sb3-contrib "
                 "(in fastppo's bench extra)")
    settings = settings_of(mode, args.total_timesteps)
    machine = machine_info("cpu")  # before the runs: a broken install fails here, not after them
    results = run(mode, args.seeds, args.tasks, threads, args.total_timesteps)
    counts = {r["contender"]: r["torch_threads"] for r in results if "torch_threads" in r}
    machine["fastppo_build_info"] = next((r["build_info"] for r in results if "build_info" in r),
                                         machine["fastppo_build_info"])
    machine["torch_threads"] = ", ".join(f"{name} {threads[side]}" + (f" = {counts[side]}" if side in counts and
                                                                        threads[side] == "default" else "")
                                         for side, name in (("fastppo", "fastppo"), ("sb3-contrib", "MaskablePPO")))
    machine["omp_num_threads"] = "per side: the thread count, unset for torch's default"
    for module, key in (("stable_baselines3", "sb3"), ("sb3_contrib", "sb3_contrib")):
        try:
            machine[key] = __import__(module).__version__
        except ImportError:
            pass
    text, ratios = summarize(results, mode, machine, threads, settings)
    print(text)
    out_dir = args.out_dir or (None if args.tiny else RESULTS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        document = dict(mode=mode, threads=threads, machine=machine, settings=settings, eval_episodes=(
            TINY_EVAL_EPISODES if args.tiny else EVAL_EPISODES), eval_seed=EVAL_SEED, solved=SOLVED, results=results,
            ratios=ratios)
        (out_dir / "masked_cpu.json").write_text(json.dumps(document, indent=1))
        (out_dir / "masked_cpu.md").write_text(text)
        plot(results, out_dir / "masked_cpu.png")
    failed = [r for r in results if "failed" in r]
    for r in failed:
        print(f"{r['task']} {r['contender']} seed {r['seed']} failed:\n{r['stderr']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
