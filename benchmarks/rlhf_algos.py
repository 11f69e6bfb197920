"""fastppo rlhf's algorithms side by side on the digits task: PPO (value model, KL penalty in the
rewards), GRPO, Dr. GRPO and RLOO (critic-free, KL term in the loss), each with the README's
settings (`fastppo rlhf`'s defaults: seed 1, 150 iterations of 64 generated responses, 4 epochs of
2 minibatches). PPO answers 64 prompts once per iteration, the group methods 8 prompts 8 times
(`--group-size 8`): the same number of generated responses, of updates and of tokens per update.

The stages (SFT policy, reward model) are made once; each algorithm then runs in a process of its
own, which reports its gold score, reward-model score and KL (means over the last 10 iterations),
the wall time of its RL iterations, its peak resident memory (``ru_maxrss``, the whole process:
Python, torch and the models) and its trainable parameters and optimizer state.

    python -m benchmarks.rlhf_algos                    # writes benchmarks/results/rlhf_algos_cpu.{md,json,png}
    python -m benchmarks.rlhf_algos --threads 1        # one torch and OpenMP thread per run (a busy machine)
    python -m benchmarks.rlhf_algos --iterations 3 --tiny --out-dir /tmp/algos   # a seconds-long smoke run
    python -m benchmarks.rlhf_algos --seeds 1,2,3 --runs ppo,grpo,grpo+kl_in=reward   # seeds and variants

A run is an algorithm, optionally with PPOConfig fields changed after ``+`` (``grpo+kl_in=reward``,
``grpo+kl_coef=0.2+kl_estimator=k1``); every other setting is the default. Each seed builds its own
stages (SFT policy, reward model) and every run of the seed starts from them; the table gives each
run's mean over the seeds and the range, and a second table each seed's gold score.

On a machine whose cores other processes also use, two threads per run wait for each other at every
one of the many small operations of these tiny models (seconds per iteration instead of a fifth of
one): ``--threads 1`` keeps the comparison about the algorithms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALGOS = ("ppo", "grpo", "dr_grpo", "rloo")
LAST = 10  # iterations averaged for the table, as the README's rlhf table does
TINY_STAGES = dict(sft_steps=20, rm_pairs=128, rm_heldout_pairs=64, rm_epochs=1)


def parse_run(run: str) -> tuple:
    """``"grpo+kl_in=reward+kl_coef=0.2"`` -> ("grpo", {"kl_in": "reward", "kl_coef": 0.2}), the values
    converted to the PPOConfig field's type."""
    from fastppo.rlhf.config import PPOConfig

    algo, *changes = run.split("+")
    if algo not in ALGOS:
        raise SystemExit(f"--runs: {run!r} starts with {algo!r}; expected one of {', '.join(ALGOS)}")
    fields = {f.name: f for f in dataclasses.fields(PPOConfig)}
    defaults = PPOConfig()
    overrides = {}
    for change in changes:
        name, _, text = change.partition("=")
        if name not in fields or not text:
            raise SystemExit(f"--runs: {change!r} in {run!r} is not FIELD=VALUE with a PPOConfig field")
        default = getattr(defaults, name)
        overrides[name] = text if default is None or isinstance(default, str) else type(default)(text)
    return algo, overrides


def _args(run: str, work: Path, iterations: int, tiny: bool, seed: int = 1):
    """fastppo rlhf's settings for ``run``: the defaults (the README's command) with the run's
    changes, no KL-off run."""
    from fastppo.rlhf import run as R

    algo, overrides = parse_run(run)
    args = R.RLHFArgs(run_dir=str(work), iterations=iterations, compare_kl_off=False, plot=False, seed=seed,
                      checkpoint_every=iterations, **(TINY_STAGES if tiny else {}))
    return dataclasses.replace(args, ppo=dataclasses.replace(args.ppo, algo=algo, **overrides))


def _rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: ``ru_maxrss`` would carry the parent's peak over
    the fork and exec that started it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(algo: str, work: Path, iterations: int, tiny: bool, threads: int, seed: int = 1) -> dict:
    """One run in this process (the seed's stages are already in ``work``); ``algo`` is a run spec."""
    import torch

    from fastppo.rlhf import run as R

    if threads:
        torch.set_num_threads(threads)

    args = _args(algo, work, iterations, tiny, seed)
    args.validate()
    stages = R.build_stages(args, work)  # loads stages.pt
    peak_before = _peak_rss_bytes()
    rss_start = _rss_bytes()
    from benchmarks._common import reset_peak_rss

    reset = reset_peak_rss()
    start = time.perf_counter()
    history = R.run_ppo(args, stages, work / algo, kl_off=False)
    wall = time.perf_counter() - start
    rss_end = _rss_bytes()
    peak = max(peak_before, _peak_rss_bytes())
    peak_run = _peak_rss_bytes() if reset else None
    trainer = R._trainer(args, stages, kl_off=False)
    params = trainer.trainable_parameters()
    adam = torch.load(work / algo / "checkpoint.pt", weights_only=False)["trainer"]["optimizer"]["state"]
    optimizer_bytes = sum(t.numel() * t.element_size() for moments in adam.values() for t in moments.values()
                          if torch.is_tensor(t) and t.dim() > 0)  # exp_avg, exp_avg_sq (not the step counts)
    cfg = trainer.config
    return {
        "algo": algo, "seed": seed, "group_size": cfg.group_size, "prompts_per_iteration": cfg.batch_size // cfg.group_size,
        "responses_per_iteration": cfg.batch_size, "kl_in": cfg.kl_in, "kl_estimator": cfg.kl_estimator,
        "kl_coef": cfg.kl_coef, "iterations": iterations, "wall_s": wall, "s_per_iteration": wall / iterations,
        "peak_rss_bytes": peak, "peak_rss_in_run_bytes": peak_run, "rss_at_start_bytes": rss_start,
        "rss_at_end_bytes": rss_end,
        "trainable_parameters": sum(p.numel() for p in params), "optimizer_state_bytes": optimizer_bytes,
        "value_model": trainer.value_module is not None, "torch_threads": torch.get_num_threads(),
        "history": [{k: r[k] for k in ("iteration", "objective/scores", "objective/gold", "objective/kl",
                                        "val/response_length", "objective/entropy")} for r in history],
    }


def _mean_last(history: list, key: str) -> float:
    last = history[-LAST:]
    return sum(r[key] for r in last) / len(last)


def _label(run: str, res: dict) -> str:
    """A run's legend: its spec, the group size and where its KL goes."""
    group = "" if res["group_size"] == 1 else f"group {res['group_size']}, "
    return f"{run} ({group}{res['kl_in']} KL)"


def plot(results: dict, sft_gold: float, path: Path) -> None:
    """Each run's seed-mean curves (the last-LAST-iterations running mean), with the range over the
    seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run, seeds in results.items():
        first = next(iter(seeds.values()))
        it = [r["iteration"] for r in first["history"]]
        for ax, key in zip(axes, ("objective/scores", "objective/gold", "objective/kl")):
            curves = []
            for res in seeds.values():
                values = [r[key] for r in res["history"]]
                curves.append([sum(values[max(0, i - LAST + 1):i + 1]) / len(values[max(0, i - LAST + 1):i + 1])
                               for i in range(len(values))])
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(it))]
            line, = ax.plot(it, mean, label=_label(run, first))
            if len(curves) > 1:
                ax.fill_between(it, [min(c[i] for c in curves) for i in range(len(it))],
                                [max(c[i] for c in curves) for i in range(len(it))], color=line.get_color(), alpha=0.15)
    axes[1].axhline(sft_gold, color="gray", linestyle=":", label="SFT policy (seed mean)")
    for ax, title in zip(axes, ("proxy: reward-model score", "hidden gold score", "KL(policy || reference) per response")):
        ax.set_title(f"{title} ({LAST}-iteration mean)", fontsize=10)
        ax.set_xlabel("iteration (64 responses each)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _spread(values, fmt="{:.2f}") -> str:
    """The mean, and the range when there are several values."""
    values = list(values)
    text = fmt.format(_mean(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def report(results: dict, stages: dict, machine: dict, command: str) -> str:
    """``results[run][seed]``: a worker's dict; ``stages[seed]``: that seed's stages report."""
    from benchmarks._common import machine_head

    first = next(iter(next(iter(results.values())).values()))
    threads, iterations = first["torch_threads"], first["iterations"]
    seeds = list(stages)
    mib = 1024 * 1024
    rows = [f"| fine-tuned policy (before RL) | | | 0.00 | {_spread(s['sft_gold'] for s in stages.values())} | 0 | | | | | | |"]
    for run, by_seed in results.items():
        rs = list(by_seed.values())
        r0 = rs[0]
        last = lambda key: [_mean_last(r["history"], key) for r in rs]  # noqa: E731
        rows.append(
            f"| {run} | {r0['prompts_per_iteration']} x {r0['group_size']} | {r0['kl_in']} ({r0['kl_estimator']}), "
            f"beta {r0['kl_coef']:g} | {_spread(last('objective/scores'))} | **{_spread(last('objective/gold'))}** | "
            f"{_spread(last('objective/kl'))} | {_mean(last('val/response_length')):.1f} | "
            f"{_mean(r['wall_s'] for r in rs):.1f} | {_mean(r['peak_rss_bytes'] for r in rs) / mib:.0f} | "
            f"{_mean((r['peak_rss_in_run_bytes'] or r['rss_at_end_bytes']) - r['rss_at_start_bytes'] for r in rs) / mib:+.1f} | "
            f"{r0['trainable_parameters']:,} | {r0['optimizer_state_bytes'] / mib:.2f} |")
    per_seed = [f"| {run} | " + " | ".join(f"{_mean_last(by_seed[s]['history'], 'objective/gold'):.2f}" for s in seeds) + " |"
                for run, by_seed in results.items()]
    sft = "| fine-tuned policy | " + " | ".join(f"{stages[s]['sft_gold']:.2f}" for s in seeds) + " |"
    accuracy = ", ".join(f"seed {s}: {stages[s]['rm_heldout_accuracy']:.3f} (ceiling {stages[s]['rm_heldout_ceiling']:.3f})"
                         for s in seeds)
    return "\n".join([
        "# fastppo rlhf: PPO, GRPO, Dr. GRPO and RLOO on the digits task",
        "",
        *machine_head(machine),
        f"- Command: `{command}`",
        "",
        f"Seeds {', '.join(map(str, seeds))}; each run: {iterations} iterations of 64 generated responses, 4 epochs x 2 "
        "minibatches per iteration, from its seed's SFT policy and reward model (reward-model held-out accuracy, "
        f"noise-free ceiling: {accuracy}). A run is an algorithm at `fastppo rlhf`'s defaults, with the PPOConfig "
        "fields after `+` changed. Scores, KL and length are means over the last "
        f"{LAST} iterations, then over the seeds (the range over the seeds in brackets); wall time and memory are "
        f"means over the seeds. Threads per run: {threads}.",
        "",
        "| run | prompts x responses | KL in (estimator), beta | reward-model score | hidden gold score | KL to the reference "
        "| response length | RL wall time (s) | peak RSS (MiB) | peak RSS of the RL run over its start (MiB) "
        "| trainable parameters | Adam state (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Gold score per seed:",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
        sft,
        *per_seed,
        "",
        "- KL: `objective/kl`, each response's summed per-token estimate against the reference, averaged "
        "(k1 with the KL in the rewards, k3 with it in the loss: both unbiased estimates of the response's KL).",
        "- RL wall time: the iterations only (sampling, scoring, the update, checkpoints), not the stages.",
        "- Peak RSS: the peak resident memory (VmHWM) of the run's own process (Python, torch, the stages, the "
        "models); the next column: the peak during the RL iterations (VmHWM reset when they start) minus the "
        "resident memory then, with the stages loaded. The models are tiny (about "
        "0.1 M parameters each), so the process's memory is mostly torch's own, and the value model's share "
        "shows best in the parameters and Adam state columns (PPO's gradients take as much again as its "
        "parameters).",
        "- Trainable parameters: the policy's, plus PPO's value model (a copy of the reward model); the "
        "group methods build none.",
        "",
        "![scores and KL per iteration](rlhf_algos_cpu.png)",
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--runs", "--algos", dest="runs", default=",".join(ALGOS),
                        help="comma-separated runs: an algorithm (" + ", ".join(ALGOS) + "), optionally with "
                        "+FIELD=VALUE changes of PPOConfig (grpo+kl_in=reward)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (each builds its own stages)")
    parser.add_argument("--tiny", action="store_true", help="tiny stages (a smoke run)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch and OpenMP threads per run (0: their defaults)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)  # the worker's
    opts = parser.parse_args(argv)
    work = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="rlhf_algos_"))
    if opts.worker:  # OMP_NUM_THREADS comes from the parent
        print(json.dumps(worker(opts.worker, work, opts.iterations, opts.tiny, opts.threads, opts.seed)))
        return 0

    runs = opts.runs.split(",")
    for run in runs:
        parse_run(run)  # a bad spec fails before any stage is built
    seeds = [int(s) for s in opts.seeds.split(",")]
    if opts.threads:  # before fastppo's OpenMP runtime loads (it reads OMP_NUM_THREADS once)
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)
    import torch

    from benchmarks._common import machine_info
    from fastppo.rlhf import run as R

    if opts.threads:
        torch.set_num_threads(opts.threads)
    results = {run: {} for run in runs}
    stages = {}
    for seed in seeds:
        seed_work = work / f"seed{seed}"
        seed_work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        stages[seed] = R.build_stages(_args("ppo", seed_work, opts.iterations, opts.tiny, seed), seed_work)["report"]
        print(f"seed {seed} stages: {time.perf_counter() - start:.0f}s", flush=True)
        for run in runs:
            cmd = [sys.executable, "-m", "benchmarks.rlhf_algos", "--worker", run, "--work-dir", str(seed_work),
                   "--iterations", str(opts.iterations), "--threads", str(opts.threads), "--seed", str(seed)]
            cmd += ["--tiny"] if opts.tiny else []
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(opts.threads)} if opts.threads else {}))
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            sys.stdout.write("".join(line + "\n" for line in done.stdout.splitlines()[:-1]))
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            r = results[run][seed] = json.loads(done.stdout.splitlines()[-1])
            print(f"seed {seed} {run}: gold {_mean_last(r['history'], 'objective/gold'):.2f}, "
                  f"kl {_mean_last(r['history'], 'objective/kl'):.2f}, {r['wall_s']:.1f}s, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.rlhf_algos", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info("cpu")
    (out / "rlhf_algos_cpu.json").write_text(json.dumps(
        {"machine": machine, "command": command, "stages": stages, "results": results}, indent=1))
    (out / "rlhf_algos_cpu.md").write_text(report(results, stages, machine, command))
    plot(results, _mean(s["sft_gold"] for s in stages.values()), out / "rlhf_algos_cpu.png")
    print(f"wrote {out / 'rlhf_algos_cpu.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
