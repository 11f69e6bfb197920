"""Benchmark ``fastppo.gae`` against the usual Python GAE loops and TorchRL.

Run from the repository root:

    python benchmarks/bench_gae.py                 # full CPU run, writes benchmarks/results/gae_cpu.md
    python benchmarks/bench_gae.py --quick         # seconds-long smoke run; prints, writes only with --out
    python benchmarks/bench_gae.py --tiny          # smallest size, 3 timed calls (a test); writes only with --out
    python benchmarks/bench_gae.py --threads 4     # torch.set_num_threads(4) and OMP_NUM_THREADS=4 (fastppo)
    python benchmarks/bench_gae.py --device cuda   # CUDA tensors; writes benchmarks/results/gae_cuda.md
    python benchmarks/bench_gae.py --out PATH      # write the Markdown report to PATH
    python benchmarks/bench_gae.py --json PATH     # also write the machine and every row as JSON

For each rollout size (T, N) it times, on the same random float32 inputs (dones ~ Bernoulli(0.02)):
``fastppo.gae`` on numpy arrays and on torch tensors; a CleanRL-style backward loop over torch
tensors; stable-baselines3's backward loop over numpy rows, re-implemented here; stable-baselines3's
own ``RolloutBuffer.compute_returns_and_advantage`` (when stable-baselines3 is installed); TorchRL's
``generalized_advantage_estimate`` and ``vec_generalized_advantage_estimate`` (when torchrl is
installed); and the memory-traffic floor, 5 float32 arrays of T*N divided by the memcpy bandwidth
measured in the same run. Every contender's output is checked against fastppo's before it is timed.
It prints a Markdown report (machine, table of median ms per call, ratios, checks) and writes it.
``collect(args)`` runs the measurements and returns them; ``python -m benchmarks`` uses it through
``--json`` to run this benchmark with the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

try:
    from benchmarks._timing import median_ms  # python -m benchmarks.bench_gae
except ImportError:
    from _timing import median_ms  # python benchmarks/bench_gae.py

# Imported in main(), after --threads has set OMP_NUM_THREADS: fastppo's OpenMP runtime reads it
# once, when the compiled module is loaded.
torch = None
fastppo = None

SIZES = [(128, 8), (2048, 1), (128, 64), (256, 1024), (1024, 4096)]
TINY_SIZES = [min(SIZES, key=lambda size: size[0] * size[1])]
GAMMA = 0.99
LAM = 0.95
DONE_PROB = 0.02
TOLERANCE = 1e-4  # max |difference| allowed between a contender's advantages and fastppo's

FP_NUMPY = "fastppo numpy"
FP_NUMPY_OUT = "fastppo numpy, out="
FP_TORCH = "fastppo torch"
CLEANRL = "CleanRL loop (torch)"
SB3 = "SB3 loop re-implemented (numpy)"
SB3_BUFFER = "SB3 RolloutBuffer"
TORCHRL_LOOP = "TorchRL GAE"
TORCHRL_VEC = "TorchRL vec GAE"
FLOOR = "memory floor"
TIME_COLUMNS = [FP_NUMPY, FP_NUMPY_OUT, FP_TORCH, CLEANRL, SB3, SB3_BUFFER, TORCHRL_LOOP, TORCHRL_VEC, FLOOR]
FASTPPO_COLUMNS = [FP_NUMPY, FP_NUMPY_OUT, FP_TORCH]
# Each peer and the fastppo column its speed-up is taken against: torch peers against fastppo on
# torch tensors, numpy peers against fastppo on numpy arrays.
PEER_BASELINES = {
    CLEANRL: FP_TORCH,
    SB3: FP_NUMPY,
    SB3_BUFFER: FP_NUMPY,
    TORCHRL_LOOP: FP_TORCH,
    TORCHRL_VEC: FP_TORCH,
}

# Timed calls per case for each run mode (median_ms's arguments). Each contender is also called
# once before it is timed (the check), which serves as its first warm-up.
TIMING = {
    "full": dict(repeats=None, warmup=1, budget_s=0.5, min_repeats=3),  # about 0.5 s, at least 3 calls
    "quick": dict(repeats=None, warmup=0, budget_s=0.02, min_repeats=1),  # about 20 ms, at least 1 call
    "tiny": dict(repeats=3, warmup=0),  # exactly 3 calls
}


# --- The peers, written out plainly -------------------------------------------------------------


def cleanrl_gae(rewards, values, starts, next_value, next_done, gamma, lam):
    """CleanRL's backward loop over torch tensors.

    ``starts[t]`` is CleanRL's ``dones[t]`` ("observation t starts a new episode") and ``next_done``
    says whether the observation after the rollout does.
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(T)):
        if t == T - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - starts[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
    return advantages, advantages + values


def sb3_gae(rewards, values, episode_starts, last_values, last_dones, gamma, lam):
    """The same loop over numpy rows, as stable-baselines3's RolloutBuffer runs it (re-implemented).

    Same convention as CleanRL: ``episode_starts[t]`` marks an observation that starts an episode.
    """
    T = rewards.shape[0]
    advantages = np.zeros_like(rewards)
    last_gae_lam = 0.0
    for step in reversed(range(T)):
        if step == T - 1:
            next_non_terminal = 1.0 - last_dones
            next_values = last_values
        else:
            next_non_terminal = 1.0 - episode_starts[step + 1]
            next_values = values[step + 1]
        delta = rewards[step] + gamma * next_values * next_non_terminal - values[step]
        last_gae_lam = delta + gamma * lam * next_non_terminal * last_gae_lam
        advantages[step] = last_gae_lam
    return advantages, advantages + values


def load_torchrl():
    """``{column: function}`` for TorchRL's two GAE functions, or a string saying why there are none."""
    try:
        from torchrl.objectives.value.functional import (
            generalized_advantage_estimate,
            vec_generalized_advantage_estimate,
        )
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken: say so in the table rather than crash
        return f"import failed ({type(exc).__name__})"
    return {TORCHRL_LOOP: generalized_advantage_estimate, TORCHRL_VEC: vec_generalized_advantage_estimate}


def load_sb3():
    """stable-baselines3's ``make_buffer(T, N)``, or a string saying why there is none."""
    try:
        import gymnasium
        from stable_baselines3.common.buffers import RolloutBuffer
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken: say so in the table rather than crash
        return f"import failed ({type(exc).__name__})"

    def make_buffer(T, N):
        return RolloutBuffer(
            buffer_size=T,
            observation_space=gymnasium.spaces.Box(-1, 1, (1,)),
            action_space=gymnasium.spaces.Discrete(2),
            device="cpu",
            gae_lambda=LAM,
            gamma=GAMMA,
            n_envs=N,
        )

    return make_buffer


# --- Inputs and contenders -----------------------------------------------------------------------


def make_inputs(T, N, seed):
    """Random float32 rollout, time-major [T, N], in fastppo's convention (dones[t]: ended at t)."""
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal((T, N), dtype=np.float32)
    values = rng.standard_normal((T, N), dtype=np.float32)
    dones = (rng.random((T, N)) < DONE_PROB).astype(np.float32)
    last_value = rng.standard_normal(N, dtype=np.float32)
    return rewards, values, dones, last_value


def to_numpy(x):
    return x.detach().cpu().numpy()


def build_contenders(rewards, values, dones, last_value, device, torchrl, sb3):
    """``{column: (call, outputs_of)}``, or ``{column: reason}`` for one that cannot run here.

    ``call()`` is what gets timed; ``outputs_of(call())`` gives (advantages, returns) as [T, N]
    numpy arrays for the check. Every conversion a peer needs (the convention shift, TorchRL's
    batch-major layout, filling SB3's buffer) is done here, before timing.
    """
    N = rewards.shape[1]
    r, v, d, last = (torch.from_numpy(x).to(device) for x in (rewards, values, dones, last_value))
    contenders = {}

    if device == "cpu":
        contenders[FP_NUMPY] = (
            lambda: fastppo.gae(rewards, values, dones, last_value, gamma=GAMMA, lam=LAM),
            lambda out: out,
        )
        # Writing into a reused rollout buffer skips allocating (and first-touching) two outputs.
        buffers = (np.empty_like(rewards), np.empty_like(rewards))
        contenders[FP_NUMPY_OUT] = (
            lambda: fastppo.gae(rewards, values, dones, last_value, gamma=GAMMA, lam=LAM, out=buffers),
            lambda out: (out[0].copy(), out[1].copy()),
        )
    else:
        contenders[FP_NUMPY] = contenders[FP_NUMPY_OUT] = "n/a (CPU)"
    contenders[FP_TORCH] = (
        lambda: fastppo.gae(r, v, d, last, gamma=GAMMA, lam=LAM),
        lambda out: (to_numpy(out[0]), to_numpy(out[1])),
    )

    # CleanRL and SB3 store "observation t starts an episode": fastppo's dones shifted one step later.
    starts = np.concatenate([np.zeros((1, N), np.float32), dones[:-1]])
    next_done = dones[-1].copy()
    starts_t, next_done_t = torch.from_numpy(starts).to(device), torch.from_numpy(next_done).to(device)
    contenders[CLEANRL] = (
        lambda: cleanrl_gae(r, v, starts_t, last, next_done_t, GAMMA, LAM),
        lambda out: (to_numpy(out[0]), to_numpy(out[1])),
    )
    if device == "cpu":
        contenders[SB3] = (
            lambda: sb3_gae(rewards, values, starts, last_value, next_done, GAMMA, LAM),
            lambda out: out,
        )
    else:
        contenders[SB3] = "n/a (numpy)"
    if device != "cpu":
        contenders[SB3_BUFFER] = "n/a (numpy)"
    elif isinstance(sb3, str):
        contenders[SB3_BUFFER] = sb3
    else:
        # SB3's buffer holds [T, N] float32 arrays; a rollout fills them step by step, here at once.
        buffer = sb3(*rewards.shape)
        buffer.rewards[:] = rewards
        buffer.values[:] = values
        buffer.episode_starts[:] = starts
        last_values_t = torch.from_numpy(last_value.copy())

        def sb3_buffer_gae():
            buffer.compute_returns_and_advantage(last_values=last_values_t, dones=next_done)
            return buffer

        contenders[SB3_BUFFER] = (sb3_buffer_gae, lambda buf: (buf.advantages.copy(), buf.returns.copy()))

    if isinstance(torchrl, str):
        contenders[TORCHRL_LOOP] = contenders[TORCHRL_VEC] = torchrl
        return contenders
    # TorchRL wants [*B, T, F] (time at dim -2, features last): [T, N] -> [N, T, 1], contiguous.
    def batch_major(x):
        return x.T.contiguous().unsqueeze(-1)

    reward = batch_major(r)
    state_value = batch_major(v)
    next_state_value = batch_major(torch.cat([v[1:], last[None]]))
    done = batch_major(d.bool())
    terminated = done.clone()
    for column, fn in torchrl.items():
        contenders[column] = (
            lambda fn=fn: fn(GAMMA, LAM, state_value, next_state_value, reward, done, terminated),
            lambda out: (to_numpy(out[0].squeeze(-1).T), to_numpy(out[1].squeeze(-1).T)),
        )
    return contenders


def check(contenders, label):
    """Runs each contender once and compares it with fastppo's output; returns warning lines."""
    warnings = []
    reference = None
    for column, contender in contenders.items():
        if isinstance(contender, str):
            continue
        call, outputs_of = contender
        advantages, returns = outputs_of(call())
        if reference is None:  # the first runnable column is fastppo's
            reference = (column, advantages, returns)
            continue
        ref_column, ref_adv, ref_ret = reference
        diff = max(float(np.max(np.abs(advantages - ref_adv))), float(np.max(np.abs(returns - ref_ret))))
        if not diff <= TOLERANCE:
            warnings.append(
                f"WARNING {label}: {column} differs from {ref_column} by up to {diff:.3g} (tolerance {TOLERANCE:g})"
            )
    return warnings


# --- The floor -----------------------------------------------------------------------------------


def copy_bandwidth(device, nbytes, repeats):
    """Bytes per second moved by a large copy (it reads and writes each byte: 2 * nbytes per copy)."""
    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.ones_like(src)  # written, so the timed copies take no page faults
        ms = median_ms(lambda: np.copyto(dst, src), repeats, warmup=1)
    else:
        import torch as torch_module  # this module's ``torch`` is set only by its own collect()

        src = torch_module.ones(nbytes // 4, dtype=torch_module.float32, device=device)
        dst = torch_module.ones_like(src)
        ms = median_ms(lambda: dst.copy_(src), repeats, warmup=1, sync=torch_module.cuda.synchronize)
    return 2 * nbytes / (ms / 1e3)


def floor_ms(T, N, bandwidth):
    """Time to move rewards, values, dones, advantages and returns (5 float32 [T, N] arrays) once."""
    return 5 * T * N * 4 / bandwidth * 1e3


# --- Report --------------------------------------------------------------------------------------


def fmt(x):
    if isinstance(x, str):
        return x
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def ratio(row, num, den):
    a, b = row.get(num), row.get(den)
    if not isinstance(a, float) or not isinstance(b, float):
        return "-"
    return fmt(a / b)


def best_torchrl(row):
    times = [row[c] for c in (TORCHRL_LOOP, TORCHRL_VEC) if isinstance(row.get(c), float)]
    return min(times) if times else "-"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_head(device, torch_module, fastppo_module, versions="", peer_line=None):
    """The machine lines every script's report starts with: date, CPU, GPU, versions (``versions``
    names the peers' libraries, ending with ", "), an optional peer line, threads and the build."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable by this process)",
    ]
    if device == "cuda":
        lines.append(f"- GPU: {torch_module.cuda.get_device_name()} (torch CUDA {torch_module.version.cuda})")
    lines.append(
        f"- Python {platform.python_version()}, numpy {np.__version__}, torch {torch_module.__version__} "
        f"({torch_module.get_num_threads()} threads), {versions}fastppo {fastppo_module.__version__}"
    )
    if peer_line is not None:
        lines.append(peer_line)
    return lines + [
        f"- OMP_NUM_THREADS: {os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- fastppo.build_info(): `{fastppo_module.build_info()}`",
    ]


def machine_lines(device, bandwidth, torchrl_version, sb3_version):
    lines = machine_head(device, torch, fastppo, f"torchrl {torchrl_version}, stable-baselines3 {sb3_version}, ")
    lines += [
        f"- Copy bandwidth: {bandwidth / 1e9:.1f} GB/s "
        + (
            "(np.copyto of a large buffer, one thread, counting read + write)"
            if device == "cpu"
            else "(device-to-device Tensor.copy_, counting read + write)"
        ),
    ]
    return lines


def report(result):
    device, mode = result["device"], result["mode"]
    warnings = result["warnings"]
    fp = FP_NUMPY_OUT if device == "cpu" else FP_TORCH  # the fastppo column the floor ratio uses
    ratio_columns = [
        (f"{CLEANRL} / {FP_TORCH}", CLEANRL, FP_TORCH),
        (f"{SB3} / {FP_NUMPY}", SB3, FP_NUMPY),
        (f"{SB3_BUFFER} / {FP_NUMPY}", SB3_BUFFER, FP_NUMPY),
        (f"best TorchRL / {FP_TORCH}", "best TorchRL", FP_TORCH),
        (f"{fp} / {FLOOR}", fp, FLOOR),
    ]
    lines = [f"# fastppo.gae benchmark ({device})", ""]
    if mode == "quick":
        lines += ["**Quick smoke run (--quick): about 20 ms of timed calls per case; not a measurement.**", ""]
    elif mode == "tiny":
        lines += [f"**Tiny run (--tiny): (T, N) in {result['sizes']}, 3 timed calls per case; a test of this "
                  "script, not a measurement.**", ""]
    lines += ["## Machine", ""]
    lines += machine_lines(device, result["bandwidth"], result["torchrl_version"], result["sb3_version"]) + [""]
    lines += [
        "## Median time per call (ms, lower is better)",
        "",
        "| T | N | " + " | ".join(TIME_COLUMNS + [name for name, _, _ in ratio_columns]) + " |",
        "|---:|---:|" + "---:|" * (len(TIME_COLUMNS) + len(ratio_columns)),
    ]
    for (T, N), row in result["rows"].items():
        row = dict(row, **{"best TorchRL": best_torchrl(row)})
        cells = [str(T), str(N)] + [fmt(row[c]) for c in TIME_COLUMNS]
        cells += [ratio(row, num, den) for _, num, den in ratio_columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Checks", ""]
    lines += [f"- **{w}**" for w in warnings] or [
        f"- Every contender's advantages and returns matched fastppo's to {TOLERANCE:g} "
        "(at T=200, N=8 and at every size above)."
    ]
    timing_note = {
        "full": "the calls that fit in about 0.5 s (at least 3), after 2 warm-up calls.",
        "quick": "the calls that fit in about 20 ms (at least 1), after 1 warm-up call.",
        "tiny": "3 calls, after 1 warm-up call.",
    }[mode]
    lines += [
        "",
        "## Notes",
        "",
        f"- Inputs: float32 rewards and values ~ N(0, 1), dones ~ Bernoulli({DONE_PROB}) stored as "
        f"float32 0/1, gamma={GAMMA}, lam={LAM}, terminated = dones. Each case is the median of "
        + timing_note,
        (
            "- fastppo's CPU kernel runs on the OpenMP threads shown by build_info(); the Python loops "
            "and TorchRL's GAE loop issue one op at a time (torch ops may use torch's threads)."
            if device == "cpu"
            else "- CUDA: every timed call is followed by torch.cuda.synchronize(), inside the timed region."
        ),
        f"- Ratios: the CleanRL loop and TorchRL (torch peers) are divided by `{FP_TORCH}`, the SB3 "
        f"loop and buffer (numpy peers) by `{FP_NUMPY}`; the floor ratio uses `{fp}`.",
        "- CleanRL and SB3 store dones as \"observation t starts an episode\"; their inputs are "
        "shifted to that convention before timing (`starts = cat([0, dones[:-1]])`, `next_done = dones[-1]`).",
        f"- `{SB3}`: stable-baselines3's backward loop written out in this script over numpy rows. "
        f"`{SB3_BUFFER}`: stable-baselines3's own `RolloutBuffer(buffer_size=T, n_envs=N)` "
        "(Box(-1, 1, (1,)) observations, Discrete(2) actions) with its `rewards`, `values` and "
        "`episode_starts` arrays filled before timing; the timed call is "
        "`compute_returns_and_advantage(last_values=<torch tensor>, dones=<numpy array>)`, which also "
        "copies last_values to numpy and allocates `returns = advantages + values`.",
        "- TorchRL gets contiguous [N, T, 1] tensors, `next_state_value = cat([values[1:], last_value])`, "
        "and bool `done` and `terminated`, all built before timing.",
        f"- `{FP_NUMPY_OUT}` writes into two preallocated arrays (as a reused rollout buffer does); "
        f"`{FP_NUMPY}` allocates its outputs, and at large sizes part of its time is the kernel "
        "zeroing the fresh pages on first touch.",
        f"- `{FLOOR}`: 5 float32 arrays of T*N (rewards, values, dones, advantages, returns) divided by "
        "the copy bandwidth above. Small cases fit in cache, where the real floor is lower.",
    ]
    return "\n".join(lines) + "\n"


# --- JSON (shared with bench_loss, bench_heads and the suite) -------------------------------------


def machine_info(device):
    """The machine and the library versions, as a dict for the JSON results."""
    import torch
    import fastppo

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "fastppo": fastppo.__version__,
        "fastppo_build_info": fastppo.build_info(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["torch_cuda"] = torch.version.cuda
    return info


def json_row(kernel, case, size, row, fastppo_columns, peers, **extra):
    """One measured case as a JSON-ready dict.

    ``row`` maps each column to its median in ms, or to the reason it was not measured; ``peers``
    maps each peer column to the fastppo column its speed-up (peer time / fastppo time) uses.
    """
    peer_entries = []
    for peer, base in peers.items():
        entry = {"name": peer, "vs": base}
        if isinstance(row[peer], float):
            entry["median_ms"] = row[peer]
            if isinstance(row[base], float):
                entry["speedup"] = row[peer] / row[base]
        else:
            entry["skipped"] = row[peer]
        peer_entries.append(entry)
    return {
        "kernel": kernel,
        "case": case,
        "size": size,
        "fastppo_ms": {c: row[c] for c in fastppo_columns if isinstance(row[c], float)},
        "fastppo_skipped": {c: row[c] for c in fastppo_columns if not isinstance(row[c], float)},
        "peers": peer_entries,
        **extra,
    }


def json_document(device, mode, parts):
    """The JSON results file: the machine, then each benchmark's summary and all its rows."""
    return {
        "machine": machine_info(device),
        "device": device,
        "mode": mode,
        "benchmarks": [{k: v for k, v in part.items() if k != "rows"} for part in parts],
        "rows": [dict(row, benchmark=part["name"]) for part in parts for row in part["rows"]],
    }


def write_json(path, document):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def to_json(result):
    """This benchmark's summary and rows, for ``json_document``."""
    rows = [
        json_row(
            "gae", f"T={T}, N={N}", {"T": T, "N": N}, row, FASTPPO_COLUMNS, PEER_BASELINES, floor_ms=row[FLOOR]
        )
        for (T, N), row in result["rows"].items()
    ]
    return {
        "name": "gae",
        "title": "fastppo.gae",
        "script": "benchmarks/bench_gae.py",
        "warnings": result["warnings"],
        "details": {
            "copy_bandwidth_gb_s": result["bandwidth"] / 1e9,
            "torchrl": result["torchrl_version"],
            "stable_baselines3": result["sb3_version"],
            "gamma": GAMMA,
            "lam": LAM,
            "tolerance": TOLERANCE,
        },
        "rows": rows,
    }


# --- Main ----------------------------------------------------------------------------------------


def threads_env(args):
    """Before torch and fastppo are imported: --threads becomes OMP_NUM_THREADS, which fastppo's
    OpenMP runtime reads once, when the compiled module loads."""
    if args.threads is not None:
        if args.threads < 1:
            sys.exit("error: --threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)


def setup_device(args, torch_module, fastppo_module):
    """After the imports: torch's thread count, and a clear exit when --device cuda cannot run.
    Returns (device, mode)."""
    if args.threads is not None:
        torch_module.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch_module.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
        if not fastppo_module.cuda_available():
            sys.exit(f"error: --device cuda, but this fastppo build cannot run on CUDA: {fastppo_module.build_info()}")
    return args.device, run_mode(args)


def run_mode(args):
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def bench_parser(description, name, quick_help, tiny_help):
    """The command line every benchmark script shares; `name` picks the default report file."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick_help)
    size.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads, and OMP_NUM_THREADS for fastppo")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"Markdown file to write (default benchmarks/results/{name}_<device>.md; "
        "--quick and --tiny write only with --out)",
    )
    parser.add_argument("--json", type=Path, help="also write the machine and every row to this JSON file")
    return parser


def write_reports(args, result, name, text, row_document):
    """Prints the Markdown report, writes it (a full run: to benchmarks/results/ by default) and,
    with --json, the machine and rows."""
    out = args.out
    if out is None and result["mode"] == "full":
        out = Path(__file__).resolve().parent / "results" / f"{name}_{args.device}.md"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    if args.json is not None:
        write_json(args.json, json_document(result["device"], result["mode"], [row_document]))
    return 0


def parse_args(argv=None):
    return bench_parser(__doc__.splitlines()[0], "gae", "seconds-long smoke run with tiny repeat counts",
                        "smallest size only, 3 timed calls: a test of the script").parse_args(argv)


def collect(args):
    """Runs the benchmark that ``args`` (from parse_args) describes and returns its measurements."""
    global torch, fastppo
    threads_env(args)
    import torch
    import fastppo

    device, mode = setup_device(args, torch, fastppo)

    torchrl = load_torchrl()
    torchrl_version = torchrl if isinstance(torchrl, str) else sys.modules["torchrl"].__version__
    sb3 = load_sb3()
    sb3_version = sb3 if isinstance(sb3, str) else sys.modules["stable_baselines3"].__version__
    sync = torch.cuda.synchronize if device == "cuda" else None
    timing = TIMING[mode]
    sizes = TINY_SIZES if mode == "tiny" else SIZES
    if mode == "full":
        bandwidth = copy_bandwidth(device, 256 << 20, repeats=None)
    else:
        bandwidth = copy_bandwidth(device, 64 << 20, repeats=3)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)

    contenders = build_contenders(*make_inputs(200, 8, seed=1), device, torchrl, sb3)
    warnings = check(contenders, "T=200, N=8")
    rows = {}
    for T, N in sizes:
        contenders = build_contenders(*make_inputs(T, N, seed=T * 100_003 + N), device, torchrl, sb3)
        warnings += check(contenders, f"T={T}, N={N}")  # also warms every contender up
        row = {}
        for column, contender in contenders.items():
            if isinstance(contender, str):
                row[column] = contender
            else:
                row[column] = median_ms(contender[0], sync=sync, **timing)
            print(f"T={T:5d} N={N:5d}  {column:32s} {fmt(row[column]):>12s} ms", file=sys.stderr)
        row[FLOOR] = floor_ms(T, N, bandwidth)
        rows[(T, N)] = row
    for w in warnings:
        print(w, file=sys.stderr)
    return dict(
        device=device, mode=mode, sizes=sizes, rows=rows, bandwidth=bandwidth,
        torchrl_version=torchrl_version, sb3_version=sb3_version, warnings=warnings,
    )


def main(argv=None):
    args = parse_args(argv)
    result = collect(args)
    return write_reports(args, result, "gae", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
