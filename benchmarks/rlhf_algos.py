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


def _args(algo: str, work: Path, iterations: int, tiny: bool):
    """fastppo rlhf's settings for ``algo``: the defaults (the README's command), no KL-off run."""
    from fastppo.rlhf import run as R

    args = R.RLHFArgs(run_dir=str(work), iterations=iterations, compare_kl_off=False, plot=False,
                      checkpoint_every=iterations, **(TINY_STAGES if tiny else {}))
    return dataclasses.replace(args, ppo=dataclasses.replace(args.ppo, algo=algo))


def _rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: ``ru_maxrss`` would carry the parent's peak over
    the fork and exec that started it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(algo: str, work: Path, iterations: int, tiny: bool, threads: int) -> dict:
    """One algorithm's run in this process (the stages are already in ``work``)."""
    import torch

    from fastppo.rlhf import run as R

    if threads:
        torch.set_num_threads(threads)

    args = _args(algo, work, iterations, tiny)
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
        "algo": algo, "group_size": cfg.group_size, "prompts_per_iteration": cfg.batch_size // cfg.group_size,
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


def plot(results: dict, sft_gold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for algo, res in results.items():
        it = [r["iteration"] for r in res["history"]]
        label = f"{algo} ({res['kl_in']} KL)" if algo == "ppo" else f"{algo} (group {res['group_size']}, {res['kl_in']} KL)"
        for ax, key in zip(axes, ("objective/scores", "objective/gold", "objective/kl")):
            values = [r[key] for r in res["history"]]
            line, = ax.plot(it, values, alpha=0.25, linewidth=0.8)
            smooth = [sum(values[max(0, i - LAST + 1):i + 1]) / len(values[max(0, i - LAST + 1):i + 1])
                      for i in range(len(values))]
            ax.plot(it, smooth, color=line.get_color(), label=label)
    axes[1].axhline(sft_gold, color="gray", linestyle=":", label="SFT policy")
    for ax, title in zip(axes, ("proxy: reward-model score", "hidden gold score", "KL(policy || reference) per response")):
        ax.set_title(f"{title} ({LAST}-iteration mean)", fontsize=10)
        ax.set_xlabel("iteration (64 responses each)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict, stages_report: dict, machine: dict, command: str) -> str:
    threads = next(iter(results.values()))["torch_threads"]
    from benchmarks._common import machine_head

    mib = 1024 * 1024
    rows = [f"| fine-tuned policy (before RL) | | | 0.00 | {stages_report['sft_gold']:.2f} | 0 | | | | | | | |"]
    for algo, r in results.items():
        h = r["history"]
        rows.append(
            f"| {algo} | {r['prompts_per_iteration']} x {r['group_size']} | {r['kl_in']} ({r['kl_estimator']}) | "
            f"{_mean_last(h, 'objective/scores'):.2f} | {_mean_last(h, 'objective/gold'):.2f} | "
            f"{_mean_last(h, 'objective/kl'):.2f} | {_mean_last(h, 'val/response_length'):.1f} | {r['wall_s']:.1f} | "
            f"{r['s_per_iteration']:.2f} | {r['peak_rss_bytes'] / mib:.0f} | "
            f"{(r['peak_rss_in_run_bytes'] or r['rss_at_end_bytes']) / mib - r['rss_at_start_bytes'] / mib:+.1f} | "
            f"{r['trainable_parameters']:,} | "
            f"{r['optimizer_state_bytes'] / mib:.2f} |")
    iterations = next(iter(results.values()))["iterations"]
    return "\n".join([
        "# fastppo rlhf: PPO, GRPO, Dr. GRPO and RLOO on the digits task",
        "",
        *machine_head(machine),
        f"- Command: `{command}`",
        "",
        f"Each run: seed 1, {iterations} iterations of 64 generated responses, 4 epochs x 2 minibatches per "
        "iteration, beta 0.05, the same SFT policy and reward model (reward-model held-out accuracy "
        f"{stages_report['rm_heldout_accuracy']:.3f}, noise-free ceiling {stages_report['rm_heldout_ceiling']:.3f}). "
        f"Scores, KL and length are means over the last {LAST} iterations. Threads per run: {threads}.",
        "",
        "| run | prompts x responses | KL in (estimator) | reward-model score | hidden gold score | KL to the reference "
        "| response length | RL wall time (s) | s / iteration | peak RSS (MiB) | peak RSS of the RL run over its start (MiB) "
        "| trainable parameters | Adam state (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "- KL: `objective/kl`, each response's summed per-token estimate against the reference, averaged "
        "(k1 for ppo, k3 for the group methods: both unbiased estimates of the response's KL).",
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
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated, from " + ", ".join(ALGOS))
    parser.add_argument("--tiny", action="store_true", help="tiny stages (a smoke run)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch and OpenMP threads per run (0: their defaults)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    work = Path(opts.work_dir) if opts.work_dir else Path(tempfile.mkdtemp(prefix="rlhf_algos_"))
    if opts.worker:  # OMP_NUM_THREADS comes from the parent
        print(json.dumps(worker(opts.worker, work, opts.iterations, opts.tiny, opts.threads)))
        return 0

    if opts.threads:  # before fastppo's OpenMP runtime loads (it reads OMP_NUM_THREADS once)
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)
    import torch

    from benchmarks._common import machine_info
    from fastppo.rlhf import run as R

    if opts.threads:
        torch.set_num_threads(opts.threads)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages = R.build_stages(_args("ppo", work, opts.iterations, opts.tiny), work)
    print(f"stages: {time.perf_counter() - start:.0f}s", flush=True)
    results = {}
    for algo in opts.algos.split(","):
        cmd = [sys.executable, "-m", "benchmarks.rlhf_algos", "--worker", algo, "--work-dir", str(work),
               "--iterations", str(opts.iterations), "--threads", str(opts.threads)] + (["--tiny"] if opts.tiny else [])
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(opts.threads)} if opts.threads else {}))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        sys.stdout.write("".join(line + "\n" for line in done.stdout.splitlines()[:-1]))
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        results[algo] = json.loads(done.stdout.splitlines()[-1])
        r = results[algo]
        print(f"{algo}: gold {_mean_last(r['history'], 'objective/gold'):.2f}, kl {_mean_last(r['history'], 'objective/kl'):.2f}, "
              f"{r['wall_s']:.1f}s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.rlhf_algos", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info("cpu")
    (out / "rlhf_algos_cpu.json").write_text(json.dumps(
        {"machine": machine, "command": command, "stages": stages["report"], "results": results}, indent=1))
    (out / "rlhf_algos_cpu.md").write_text(report(results, stages["report"], machine, command))
    plot(results, stages["report"]["sft_gold"], out / "rlhf_algos_cpu.png")
    print(f"wrote {out / 'rlhf_algos_cpu.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
