"""Data-parallel throughput: ``fastppo train`` on 1 process against ``torchrun`` with K processes.

Each configuration trains the same run (same total environments, batch and minibatches: the
ranks share them) for a fixed number of steps; the steps per second are the run's own (setup
excluded), medians over ``--repeats`` runs. Writes ``results/distributed_<device>.md`` / ``.json``.

    python -m benchmarks.distributed [--processes 2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import RESULTS, cpu_model, median

CASES = {  # name: flags of the whole run (num_envs is divided among the ranks)
    "CartPole-v1 (classic preset, 8 envs)": ["--env-id", "CartPole-v1", "--preset", "classic", "--num-envs", "8",
                                             "--total-timesteps", "49152"],
    "HalfCheetah-v5 (mujoco preset, 2 envs)": ["--env-id", "HalfCheetah-v5", "--num-envs", "2",
                                               "--total-timesteps", "40960"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(flags: list, processes: int, device: str) -> dict:
    """One training run; returns rank 0's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        train = ["-m", "fastppo", "train", *flags, "--device", device, "--run-dir", tmp, "--log-every", "1000000"]
        if processes == 1:
            cmd = [sys.executable, *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                   "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *train]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="K of the data-parallel runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name, flags in CASES.items():
        sps = {}
        for k in (1, args.processes):
            summaries = [run(flags, k, args.device) for _ in range(args.repeats)]
            runs = [s["global_step"] / s["seconds"] for s in summaries]
            sps[k] = median(runs)
            print(f"{name}: {k} process(es): {sps[k]:,.0f} steps/s (runs: {', '.join(f'{x:,.0f}' for x in runs)})",
                  flush=True)
        rows.append(dict(case=name, sps_1=sps[1], sps_k=sps[args.processes], ratio=sps[args.processes] / sps[1]))
    k = args.processes
    lines = [f"# Data-parallel throughput: 1 process vs torchrun with {k} ({args.device})", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores. Medians of {args.repeats} runs; steps/s of the whole "
             "run (all ranks), setup excluded. Each rank's OpenMP threads: cores / processes.", "",
             f"| run | 1 process | {k} processes | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['sps_1']:,.0f} | {r['sps_k']:,.0f} | {r['ratio']:.2f}x |" for r in rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"distributed_{args.device}.md").write_text("\n".join(lines) + "\n")
    (args.out_dir / f"distributed_{args.device}.json").write_text(json.dumps(dict(processes=k, rows=rows), indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
