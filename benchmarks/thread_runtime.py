"""fastppo's CPU threads beside torch's, in one process: is a torch step slower right after a fastppo
kernel than on its own, and is a fastppo kernel slower right after a torch step?

Two OpenMP runtimes in one process (fastppo's and torch's) can each keep their threads spinning on
the cores after a parallel region, and the other library's next region then waits for them. This
script times, in one process and with torch's default intra-op threads:

  (i)   a torch step alone (right after the same step),
  (ii)  the same torch step right after a fastppo kernel,
  (iii) a fastppo kernel alone (right after the same kernel),
  (iv)  the same kernel right after the torch step,

for two torch steps (a CleanRL-sized MLP actor-critic's forward, backward and Adam step at batch
4096; a tanh, multiply and matmul over [4096, 1024] floats) and two kernels (``fastppo.ppo_loss``
forward and backward at B = 2^20 float32; ``fastppo.gae`` at T = 128, N = 4096 float32). Each round
takes every case once, in a fresh random order, and each case is the median over the rounds; the
ratios (ii)/(i) and (iv)/(iii) are the slowdowns. It also times ``import fastppo`` (without torch) in
fresh processes.

One run measures one configuration, named by ``--label``; the result is added to (or replaces the
same label in) benchmarks/results/thread_runtime_cpu.json, and thread_runtime_cpu.md is rewritten
as a table over every label there:

    python -m benchmarks.thread_runtime --label openmp-system
    python -m benchmarks.thread_runtime --label openmp-system-fastppo-first --import-first fastppo
    python -m benchmarks.thread_runtime --tiny --label smoke --out-dir /tmp/x   # seconds: a check

Which library a configuration really runs on shows in the report: ``fastppo.build_info()`` names
the thread runtime and, under OpenMP, the runtime library the module's OpenMP calls resolved to
(the import order can change it). Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS, machine_info

STEPS = {"mlp": "MLP step", "op": "torch op"}
KERNELS = {"ppo_loss": "ppo_loss", "gae": "gae"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="the configuration's name: a row of the report")
    parser.add_argument("--import-first", choices=["torch", "fastppo"], default="torch",
                        help="which library this process imports first (it can decide which libgomp both use)")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds; each case once per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds before them")
    parser.add_argument("--import-runs", type=int, default=7, help="fresh processes timing `import fastppo`")
    parser.add_argument("--tiny", action="store_true",
                        help="small sizes, 2 rounds, 1 import run: checks that the script runs, measures nothing")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and Markdown reports go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.warmup, args.import_runs = 2, 0, 1
    for name in ("rounds", "import_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def import_time_s(runs):
    """Median wall time of `import fastppo` in fresh interpreters (torch not imported)."""
    code = ("import sys, time\nstart = time.perf_counter()\nimport fastppo\n"
            "print(time.perf_counter() - start, 'torch' in sys.modules)")
    times, pulls_torch = [], False
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        pulls_torch |= out[1] == "True"
    return statistics.median(times), pulls_torch


def make_cases(tiny):
    """The torch steps and fastppo kernels, as calls without arguments."""
    import torch
    from torch import nn

    import fastppo

    g = torch.Generator().manual_seed(0)
    batch = 256 if tiny else 4096

    # CleanRL's ppo_continuous_action agent on a MuJoCo-sized task (17 observations, 6 actions).
    def mlp(out_features):
        return nn.Sequential(nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out_features))

    actor, critic = mlp(6), mlp(1)
    logstd = nn.Parameter(torch.zeros(6))
    params = [*actor.parameters(), *critic.parameters(), logstd]
    optimizer = torch.optim.Adam(params, lr=3e-4, eps=1e-5)
    obs, actions = torch.randn(batch, 17, generator=g), torch.randn(batch, 6, generator=g)
    advantages, returns = torch.randn(batch, generator=g), torch.randn(batch, generator=g)

    def mlp_step():
        mean = actor(obs)
        logprob = (-0.5 * ((actions - mean) / logstd.exp()).square() - logstd - 0.5 * math.log(2 * math.pi)).sum(1)
        value = critic(obs).squeeze(1)
        loss = -(logprob * advantages).mean() + 0.5 * (value - returns).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rows = 256 if tiny else 4096
    a, b = torch.randn(rows, 1024, generator=g), torch.randn(rows, 1024, generator=g)
    w = torch.randn(1024, 256, generator=g)

    def op_step():
        return torch.tanh(a).mul_(b).matmul(w)

    n = 1 << (16 if tiny else 20)
    new_logprob = (torch.randn(n, generator=g) * 0.1).requires_grad_()
    new_value, entropy = torch.randn(n, generator=g).requires_grad_(), torch.rand(n, generator=g).requires_grad_()
    old_logprob, adv, old_value, ret = (torch.randn(n, generator=g) for _ in range(4))
    loss_inputs = (new_logprob, new_value, entropy)

    def ppo_loss():
        for x in loss_inputs:
            x.grad = None
        out = fastppo.ppo_loss(new_logprob, old_logprob * 0.1, adv, new_value, old_value, ret, entropy, ent_coef=0.01)
        out.loss.backward()

    T, N = 128, (512 if tiny else 4096)
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = torch.rand(T, N, generator=g) < 0.01
    last_value = torch.randn(N, generator=g)

    def gae():
        return fastppo.gae(rewards, values, dones, last_value, terminated=dones)

    return {"mlp": mlp_step, "op": op_step}, {"ppo_loss": ppo_loss, "gae": gae}


def measure(steps, kernels, rounds, warmup, seed):
    """Per case (what is timed, what ran just before it): the median seconds over the rounds."""
    calls = {**steps, **kernels}
    cases = [(s, s) for s in steps] + [(s, k) for s in steps for k in kernels]
    cases += [(k, k) for k in kernels] + [(k, s) for k in kernels for s in steps]
    times = {case: [] for case in cases}
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        order = cases[:]
        rng.shuffle(order)
        for timed, before in order:
            calls[before]()
            start = time.perf_counter()
            calls[timed]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[(timed, before)].append(elapsed)
    return {case: statistics.median(t) for case, t in times.items()}


def ratio_key(timed, before):
    return f"{timed} after {before}"


def record(args, steps, kernels, medians, import_s, import_pulls_torch):
    import torch

    import fastppo

    raw = fastppo._C.build_info()
    alone = {name: medians[(name, name)] * 1e3 for name in [*steps, *kernels]}
    after = {ratio_key(t, b): medians[(t, b)] * 1e3 for (t, b) in medians if t != b}
    ratios = {key: after[key] / alone[key.split(" after ")[0]] for key in after}
    return {
        "label": args.label,
        "import_first": args.import_first,
        "tiny": args.tiny,
        "rounds": args.rounds,
        "thread_runtime": raw["thread_runtime"],
        "thread_runtime_library": raw["thread_runtime_library"],
        "fastppo_threads": raw["threads"],
        "torch_threads": torch.get_num_threads(),
        "torch_parallel_info": torch.__config__.parallel_info(),
        "import_fastppo_ms": import_s * 1e3,
        "import_fastppo_pulls_torch": import_pulls_torch,
        "alone_ms": alone,
        "after_ms": after,
        "ratios": ratios,
        "machine": machine_info("cpu"),
    }


def update_results(out_dir, entry):
    """The JSON over labels (a label measured again replaces its entry), and its Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "thread_runtime_cpu.json"
    entries = json.loads(path.read_text())["runs"] if path.exists() else []
    entries = [e for e in entries if e["label"] != entry["label"]] + [entry]
    path.write_text(json.dumps({"runs": entries}, indent=2) + "\n")
    (out_dir / "thread_runtime_cpu.md").write_text(markdown(entries))
    return path


def library_name(path):
    """torch's bundled libgomp, a grafted copy (fastppo.libs/...), or the system's by its path."""
    for folder in ("torch/lib/", "fastppo.libs/"):
        if folder in path:
            return folder + os.path.basename(path)
    return path or "?"


def runtime_cell(entry):
    if entry["thread_runtime"] == "openmp":
        return f"OpenMP ({library_name(entry['thread_runtime_library'])})"
    return {"pool": "fastppo pool", "none": "none (1 thread)"}.get(entry["thread_runtime"], entry["thread_runtime"])


def markdown(entries):
    pairs = [(s, k) for s in STEPS for k in KERNELS] + [(k, s) for k in KERNELS for s in STEPS]
    names = {**STEPS, **KERNELS}
    head = ["label", "thread runtime (library)", "imported first", "threads fastppo / torch", "import fastppo (ms)"]
    head += [f"{names[t]} after {names[b]}" for t, b in pairs]
    lines = [
        "# fastppo's CPU threads beside torch's (one process)",
        "",
        "Written by `python -m benchmarks.thread_runtime` (see its docstring); one row per configuration (`--label`).",
        "Each ratio is a median time right after the other library's call over the median time right after the",
        "same call again: 1.00 means no slowdown. Torch steps: the MLP step is CleanRL's continuous-action",
        "actor-critic (17-64-64 tanh, 6 actions) forward, backward and Adam at batch 4096; the torch op is",
        "tanh, multiply and matmul over [4096, 1024] float32. Kernels: `ppo_loss` forward and backward at",
        "B = 2^20 float32, `gae` at T = 128, N = 4096 float32.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for e in entries:
        cells = [e["label"] + (" (tiny)" if e["tiny"] else ""), runtime_cell(e), e["import_first"],
                 f"{e['fastppo_threads']} / {e['torch_threads']}", f"{e['import_fastppo_ms']:.0f}"]
        cells += [f"{e['ratios'][ratio_key(t, b)]:.2f}" for t, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Medians alone (ms):", "",
              "| label | " + " | ".join(names[n] for n in names) + " | rounds | machine |",
              "|" + "---|" * (len(names) + 3)]
    for e in entries:
        m = e["machine"]
        cells = [e["label"]] + [f"{e['alone_ms'][n]:.3f}" for n in names]
        cells += [str(e["rounds"]), f"{m['cpu']}, {m['usable_cores']} usable cores, {m['date']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Libraries each row ran on (`fastppo.build_info()`):", ""]
    lines += [f"- {e['label']}: `{e['machine']['fastppo_build_info']}`" for e in entries]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    # The import order is the configuration: the first library to load libgomp.so.1 gives it to both.
    if args.import_first == "fastppo":
        import fastppo  # noqa: F401
        import torch  # noqa: F401
    else:
        import torch  # noqa: F401
        import fastppo  # noqa: F401
    steps, kernels = make_cases(args.tiny)
    medians = measure(steps, kernels, args.rounds, args.warmup, args.seed)
    import_s, pulls_torch = import_time_s(args.import_runs)
    entry = record(args, steps, kernels, medians, import_s, pulls_torch)
    path = update_results(args.out_dir, entry)
    print(f"{args.label}: {runtime_cell(entry)}, imported first: {args.import_first}, "
          f"threads fastppo {entry['fastppo_threads']} / torch {entry['torch_threads']}, "
          f"import fastppo {entry['import_fastppo_ms']:.0f} ms")
    for key, value in entry["ratios"].items():
        alone = entry["alone_ms"][key.split(" after ")[0]]
        print(f"  {key}: {value:.3f} ({entry['after_ms'][key]:.3f} ms vs {alone:.3f} ms alone)")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
