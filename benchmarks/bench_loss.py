"""Benchmark ``fastppo.ppo_loss`` against CleanRL's PPO loss in torch eager and under torch.compile.

Run from the repository root:

    python benchmarks/bench_loss.py                 # full CPU run, writes benchmarks/results/loss_cpu.md
    python benchmarks/bench_loss.py --quick         # smoke run (B = 64, 4096); prints, writes only with --out
    python benchmarks/bench_loss.py --tiny          # B = 64, 3 timed calls, no torch.compile (a test); same
    python benchmarks/bench_loss.py --threads 4     # torch.set_num_threads(4) and OMP_NUM_THREADS=4 (fastppo)
    python benchmarks/bench_loss.py --device cuda   # CUDA tensors; writes benchmarks/results/loss_cuda.md
    python benchmarks/bench_loss.py --out PATH      # write the Markdown report to PATH
    python benchmarks/bench_loss.py --json PATH     # also write the machine and every row as JSON

For each batch size B it times one training step's worth of loss work, forward and backward: the
loss with every part (clipped surrogate, clipped value loss, entropy bonus with ent_coef=0.01,
and the stats approx_kl, old_approx_kl and clipfrac), then ``torch.autograd.grad`` of the loss
with respect to new_logprob, new_value and entropy (float32 leaf tensors of B elements). Contenders:
``fastppo.ppo_loss``; CleanRL's ppo.py loss written out in torch eager; the same function under
``torch.compile`` (inductor, ``dynamic=False``, compiled afresh for each B, its first call, the
compile, reported in its own table); and the memory-traffic floor, 10 float32 arrays of B (7 inputs
read, 3 gradients written) divided by the copy bandwidth measured in the same run. It also reports
each contender's peak extra memory during one call, and checks once per size that fastppo's (and
the compiled function's) loss and gradients match the eager formula. It prints a Markdown report
(machine, tables, ratios, checks) and writes it. ``collect(args)`` runs the measurements and
returns them; ``python -m benchmarks`` uses it through ``--json`` to run this benchmark with the others.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time

try:  # python -m benchmarks.bench_loss
    from benchmarks._timing import median_ms
    from benchmarks.bench_gae import (TIMING, bench_parser, copy_bandwidth, fmt, json_row, machine_head, ratio,
                                      setup_device, threads_env, write_reports)
except ImportError:  # python benchmarks/bench_loss.py
    from _timing import median_ms
    from bench_gae import (TIMING, bench_parser, copy_bandwidth, fmt, json_row, machine_head, ratio, setup_device,
                           threads_env, write_reports)

# Imported in main(), after --threads has set OMP_NUM_THREADS (fastppo's OpenMP runtime reads it
# once, when the compiled module is loaded) and after TORCHINDUCTOR_CACHE_DIR is chosen.
torch = None
fastppo = None

SIZES = [64, 512, 4096, 65536, 1048576]
QUICK_SIZES = [64, 4096]
TINY_SIZES = [min(SIZES)]
WARMUP_COMPILE_SIZE = 8  # compiled once first, untimed in the tables, to absorb one-time setup
CLIP_COEF = 0.2
VF_COEF = 0.5
ENT_COEF = 0.01
TOLERANCE = 1e-4  # relative difference allowed between fastppo's loss / gradients and eager's
FLOOR_ARRAYS = 10  # 7 float32 inputs read + 3 float32 gradients written

FASTPPO = "fastppo"
EAGER = "CleanRL eager"
COMPILED = "CleanRL torch.compile"
FLOOR = "memory floor"
CONTENDERS = [FASTPPO, EAGER, COMPILED]
PEER_BASELINES = {EAGER: FASTPPO, COMPILED: FASTPPO}  # each peer and the column its speed-up is taken against
NOT_COMPILED = "not run (--tiny)"  # --tiny leaves torch.compile out
TIME_COLUMNS = CONTENDERS + [FLOOR]
GRADS = "3 gradients"  # the memory the returned gradients take: 3 * 4 * B bytes


# --- The peer, written out plainly ---------------------------------------------------------------


def cleanrl_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy):
    """CleanRL ppo.py's loss and stats (norm_adv, clip_vloss on; value clip = clip_coef).

    The stats are computed under no_grad as CleanRL does, but kept as tensors: CleanRL's
    ``.item()`` on clipfrac would synchronize, and fastppo returns its stats as tensors too.
    """
    logratio = newlogprob - oldlogprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > CLIP_COEF).float().mean()
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - CLIP_COEF, 1 + CLIP_COEF)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    v_loss_unclipped = (newvalue - returns) ** 2
    v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -CLIP_COEF, CLIP_COEF)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ENT_COEF * entropy_loss + v_loss * VF_COEF
    return loss, pg_loss, v_loss, entropy_loss, approx_kl, old_approx_kl, clipfrac


def fastppo_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy):
    return fastppo.ppo_loss(
        newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy,
        clip_coef=CLIP_COEF, vf_coef=VF_COEF, ent_coef=ENT_COEF, clip_vloss=True,
    )


# --- Inputs and contenders -----------------------------------------------------------------------


def make_inputs(B, device, seed):
    """Random float32 [B] tensors; new_logprob, new_value and entropy are leaves that require grad.

    The new policy and critic are perturbed versions of the old ones, so both clips are active
    on a good share of the elements (about a third of the ratios, half of the value updates).
    """
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(B, generator=g, dtype=torch.float32)

    old_logprob = -randn().abs() - 0.5
    new_logprob = old_logprob + 0.2 * randn()
    advantages = randn()
    old_value = randn()
    new_value = old_value + 0.3 * randn()
    returns = old_value + randn()
    entropy = 0.5 + torch.rand(B, generator=g, dtype=torch.float32)
    tensors = [x.to(device) for x in (new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy)]
    for i in (0, 3, 6):  # new_logprob, new_value, entropy
        tensors[i].requires_grad_(True)
    return tensors


def step_call(loss_fn, inputs):
    """The timed call: the loss with all its parts, then the gradients w.r.t. the three leaves."""
    params = [inputs[0], inputs[3], inputs[6]]

    def call():
        loss = loss_fn(*inputs)[0]
        return loss.detach(), torch.autograd.grad(loss, params)

    return call


def rel_diff(a, b):
    """max |a - b| / max |b| (b the reference), as a float."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / max(scale, 1e-30)


def check(column, outputs, reference, label):
    """Compares (loss, grads) with the eager reference; returns warning lines."""
    names = ["loss", "grad new_logprob", "grad new_value", "grad entropy"]
    got = [outputs[0]] + list(outputs[1])
    ref = [reference[0]] + list(reference[1])
    warnings = []
    for name, a, b in zip(names, got, ref):
        diff = rel_diff(a.detach().double(), b.detach().double())
        if not diff <= TOLERANCE:  # also catches NaN
            warnings.append(
                f"WARNING {label}: {column} {name} differs from {EAGER} by {diff:.3g} relative (tolerance {TOLERANCE:g})"
            )
    return warnings


def compile_loss():
    """A fresh compiled function; dynamo's caches are cleared first, so the next call compiles."""
    torch._dynamo.reset()
    return torch.compile(cleanrl_loss, dynamic=False)


def timed_first_call(call, sync):
    if sync is not None:
        sync()
    start = time.perf_counter()
    out = call()
    if sync is not None:
        sync()
    return out, (time.perf_counter() - start) * 1e3


# --- Memory --------------------------------------------------------------------------------------


def peak_extra_bytes(call, device):
    """Peak bytes allocated during one ``call()`` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before the call. CPU: torch.profiler with profile_memory=True records every allocation and
    free made through torch's CPU allocator; the peak is the largest running sum of their sizes,
    in time order. Either way the returned gradients count (they are allocated during the call).
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return f"n/a ({type(exc).__name__})"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        running += size
        peak = max(peak, running)
    return peak


def fmt_bytes(x):
    if isinstance(x, str):
        return x
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


# --- The floor -----------------------------------------------------------------------------------


def floor_ms(B, bandwidth):
    """Time to read the 7 float32 inputs and write the 3 float32 gradients of B elements once."""
    return FLOOR_ARRAYS * B * 4 / bandwidth * 1e3


# --- Report --------------------------------------------------------------------------------------


def repay_calls(row):
    """Calls after which compiling has paid for itself against eager, or a reason it never does."""
    first, eager, compiled = row.get("compile"), row.get(EAGER), row.get(COMPILED)
    if not all(isinstance(x, float) for x in (first, eager, compiled)):
        return "-"
    if compiled >= eager:
        return "never"
    return f"{max(first - eager, 0.0) / (eager - compiled):.0f}"


def machine_lines(device, bandwidth, compile_info):
    lines = machine_head(device, torch, fastppo)
    lines += [
        f"- torch.compile: {compile_info}",
        f"- Copy bandwidth: {bandwidth / 1e9:.1f} GB/s "
        + (
            "(np.copyto of a large buffer, one thread, counting read + write)"
            if device == "cpu"
            else "(device-to-device Tensor.copy_, counting read + write)"
        ),
    ]
    return lines


def report(result):
    rows, device, mode, sizes = result["rows"], result["device"], result["mode"], result["sizes"]
    warnings = result["warnings"]
    ratio_columns = [
        (f"{EAGER} / {FASTPPO}", EAGER, FASTPPO),
        (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO),
        (f"{FASTPPO} / {FLOOR}", FASTPPO, FLOOR),
    ]
    lines = [f"# fastppo.ppo_loss benchmark ({device})", ""]
    if mode == "quick":
        lines += [
            f"**Quick smoke run (--quick): B in {sizes}, about 20 ms of timed calls per case; not a measurement.**",
            "",
        ]
    elif mode == "tiny":
        lines += [
            f"**Tiny run (--tiny): B in {sizes}, 3 timed calls per case, no torch.compile; a test of this "
            "script, not a measurement.**",
            "",
        ]
    lines += ["## Machine", ""] + machine_lines(device, result["bandwidth"], result["compile_info"]) + [""]
    lines += [
        "## Median time per forward + backward call (ms, lower is better)",
        "",
        "| B | " + " | ".join(TIME_COLUMNS + [name for name, _, _ in ratio_columns]) + " |",
        "|---:|" + "---:|" * (len(TIME_COLUMNS) + len(ratio_columns)),
    ]
    for B, row in rows.items():
        cells = [str(B)] + [fmt(row[c]) for c in TIME_COLUMNS]
        cells += [ratio(row, num, den) for _, num, den in ratio_columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    lines += [f"**{w}**" for w in warnings] or [
        "Checks: at every B, fastppo's "
        + ("" if mode == "tiny" else "and the compiled function's ")
        + f"loss and three gradients matched "
        f"{EAGER}'s to {TOLERANCE:g} relative (max |difference| / max |eager|)."
    ]
    lines += [
        "",
        f"## {COMPILED}: compile time (first call at each B, not in the table above)",
        "",
        "| B | first call (s) | later calls (ms) | calls until compiling repays vs eager |",
        "|---:|---:|---:|---:|",
    ]
    for B, row in rows.items():
        first = row["compile"]
        cells = [str(B), fmt(first / 1e3) if isinstance(first, float) else first, fmt(row[COMPILED]), repay_calls(row)]
        lines.append("| " + " | ".join(cells) + " |")
    mem_ratio_columns = [(f"{EAGER} / {FASTPPO}", EAGER, FASTPPO), (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO)]
    lines += [
        "",
        "## Peak extra memory during one forward + backward call (lower is better)",
        "",
        "| B | " + " | ".join(CONTENDERS + [GRADS] + [name for name, _, _ in mem_ratio_columns]) + " |",
        "|---:|" + "---:|" * (len(CONTENDERS) + 1 + len(mem_ratio_columns)),
    ]
    for B, row in rows.items():
        mem = row["memory"]
        cells = [str(B)] + [fmt_bytes(mem[c]) for c in CONTENDERS] + [fmt_bytes(3 * 4 * B)]
        cells += [ratio({k: float(v) if isinstance(v, int) else v for k, v in mem.items()}, num, den)
                  for _, num, den in mem_ratio_columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Notes",
        "",
        "- Inputs: float32 tensors of B elements: old_logprob = -|N(0,1)| - 0.5, new_logprob = old_logprob + "
        "0.2 N(0,1), advantages ~ N(0,1), old_value ~ N(0,1), new_value = old_value + 0.3 N(0,1), returns = "
        "old_value + N(0,1), entropy ~ U(0.5, 1.5); new_logprob, new_value and entropy are leaves with "
        "requires_grad.",
        f"- Timed call: the loss with all its parts (clip_coef={CLIP_COEF}, vf_coef={VF_COEF}, ent_coef={ENT_COEF}, "
        "advantage normalization, clipped value loss, and the stats approx_kl, old_approx_kl, clipfrac), then "
        "`torch.autograd.grad(loss, [new_logprob, new_value, entropy])`. Each contender is timed in its own "
        "block of consecutive calls; each case is the median of "
        + {
            "full": "the calls that fit in about 0.5 s (at least 3), after 2 warm-up calls.",
            "quick": "the calls that fit in about 20 ms (at least 1), after 1 warm-up call.",
            "tiny": "3 calls, after 1 warm-up call.",
        }[mode],
        f"- `{EAGER}`: CleanRL ppo.py's loss lines in plain torch; its stats are computed under no_grad as "
        "CleanRL does but left as tensors (CleanRL's `.item()` would synchronize; fastppo returns tensors too).",
        f"- `{COMPILED}`: the same function under `torch.compile(..., dynamic=False)` (inductor). Dynamo's caches "
        "are reset before each B, so each B compiles once, forward and backward graphs, with one cache entry "
        "in use while it is timed. Its first call at each B (the compile, measured with time.perf_counter) is "
        "the compile table's column; a one-time warm-up compile at "
        f"B={WARMUP_COMPILE_SIZE} first absorbs process-wide setup (imports, compile workers).",
        (
            "- fastppo's CPU kernel runs on the OpenMP threads shown by build_info(); eager torch ops and "
            "inductor's C++ kernels use torch's threads."
            if device == "cpu"
            else "- CUDA: every timed call is followed by torch.cuda.synchronize(), inside the timed region."
        ),
        (
            "- Memory (CPU): `torch.profiler.profile(profile_memory=True)` around one call records each allocation "
            "and free made through torch's CPU allocator; the figure is the largest running sum of those sizes "
            "in time order, i.e. the peak bytes held above what was held before the call. Memory a kernel "
            "allocates on its own (malloc, std::vector) is not seen."
            if device == "cpu"
            else "- Memory (CUDA): `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus "
            "`memory_allocated()` before the call (tensors from torch's caching allocator, not its reserved pool)."
        ),
        f"- `{GRADS}`: 3 * 4 * B bytes, what the three returned gradients take when each is a full array; "
        "they are part of every contender's figure (a gradient returned as a broadcast view, as the entropy's "
        "constant gradient can be, takes no array).",
        f"- `{FLOOR}`: {FLOOR_ARRAYS} float32 arrays of B (7 inputs read, 3 gradients written) divided by the copy "
        "bandwidth above. Small cases fit in cache and are bound by per-call overhead, where this floor means little.",
    ]
    return "\n".join(lines) + "\n"


# --- JSON ----------------------------------------------------------------------------------------


def to_json(result):
    """This benchmark's summary and rows, for bench_gae's ``json_document``."""
    rows = [
        json_row(
            "ppo_loss", f"B={B}", {"B": B}, row, [FASTPPO], PEER_BASELINES,
            floor_ms=row[FLOOR], compile_first_call_ms=row["compile"], peak_extra_bytes=row["memory"],
        )
        for B, row in result["rows"].items()
    ]
    return {
        "name": "ppo_loss",
        "title": "fastppo.ppo_loss (forward + backward)",
        "script": "benchmarks/bench_loss.py",
        "warnings": result["warnings"],
        "details": {
            "copy_bandwidth_gb_s": result["bandwidth"] / 1e9,
            "torch_compile": result["compile_info"],
            "clip_coef": CLIP_COEF,
            "vf_coef": VF_COEF,
            "ent_coef": ENT_COEF,
            "tolerance": TOLERANCE,
        },
        "rows": rows,
    }


# --- Main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    return bench_parser(__doc__.splitlines()[0], "loss", "smoke run: B in 64, 4096 and tiny repeat counts",
                        "B = 64, 3 timed calls, no torch.compile: a test of the script").parse_args(argv)


def with_cold_compile_cache(args, prefix, measure):
    """Applies --threads, then runs ``measure(args, own_cache)`` with inductor's on-disk caches
    starting empty (a cold compile), unless the caller chose TORCHINDUCTOR_CACHE_DIR."""
    threads_env(args)
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=prefix)
    try:
        return measure(args, own_cache)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)


def collect(args):
    """Runs the benchmark that ``args`` (from parse_args) describes and returns its measurements."""
    return with_cold_compile_cache(args, "bench_loss_inductor_", measure)


def measure(args, own_cache):
    global torch, fastppo
    import torch
    import torch._dynamo
    import fastppo

    device, mode = setup_device(args, torch, fastppo)
    sizes = {"full": SIZES, "quick": QUICK_SIZES, "tiny": TINY_SIZES}[mode]
    compiling = mode != "tiny"

    sync = torch.cuda.synchronize if device == "cuda" else None
    # Each contender is called once (checked, and for torch.compile, compiled) before it is timed:
    # that call is its first warm-up.
    timing = TIMING[mode]
    if mode == "full":
        bandwidth = copy_bandwidth(device, 256 << 20, repeats=None)
    else:
        bandwidth = copy_bandwidth(device, 64 << 20, repeats=3)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)

    if compiling:
        # One-time costs of the first compile in a process (imports, worker pool), kept out of the table.
        warm_inputs = make_inputs(WARMUP_COMPILE_SIZE, device, seed=0)
        _, warm_ms = timed_first_call(step_call(compile_loss(), warm_inputs), sync)
        print(f"warm-up compile at B={WARMUP_COMPILE_SIZE}: {warm_ms / 1e3:.1f} s", file=sys.stderr)
        compile_info = (
            "inductor, dynamic=False, recompiled for each B; "
            + ("fresh (empty) inductor cache dir for this run" if own_cache
               else f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (may be warm)")
            + f"; one-time warm-up compile at B={WARMUP_COMPILE_SIZE}: {warm_ms / 1e3:.1f} s"
        )
        if device == "cuda":
            try:
                import triton

                compile_info += f"; triton {triton.__version__}"
            except ImportError:
                pass
    else:
        compile_info = NOT_COMPILED

    warnings = []
    rows = {}
    for B in sizes:
        label = f"B={B}"
        inputs = make_inputs(B, device, seed=B)
        calls = {FASTPPO: step_call(fastppo_loss, inputs), EAGER: step_call(cleanrl_loss, inputs)}
        reference = calls[EAGER]()
        warnings += check(FASTPPO, calls[FASTPPO](), reference, label)
        row = {"compile": NOT_COMPILED}
        if compiling:
            calls[COMPILED] = step_call(compile_loss(), inputs)
            compiled_out, row["compile"] = timed_first_call(calls[COMPILED], sync)
            warnings += check(COMPILED, compiled_out, reference, label)
            del compiled_out
            print(f"B={B:8d}  {'compile (first call)':22s} {fmt(row['compile']):>12s} ms", file=sys.stderr)
        del reference
        for column in CONTENDERS:
            row[column] = median_ms(calls[column], sync=sync, **timing) if column in calls else NOT_COMPILED
            print(f"B={B:8d}  {column:22s} {fmt(row[column]):>12s} ms", file=sys.stderr)
        row[FLOOR] = floor_ms(B, bandwidth)
        row["memory"] = {
            column: peak_extra_bytes(calls[column], device) if column in calls else NOT_COMPILED
            for column in CONTENDERS
        }
        print(f"B={B:8d}  peak extra memory: "
              + ", ".join(f"{c} {fmt_bytes(m)}" for c, m in row["memory"].items()), file=sys.stderr)
        rows[B] = row
        del calls, inputs
    for w in warnings:
        print(w, file=sys.stderr)
    return dict(
        device=device, mode=mode, sizes=sizes, rows=rows, bandwidth=bandwidth,
        compile_info=compile_info, warnings=warnings,
    )


def main(argv=None):
    args = parse_args(argv)
    result = collect(args)
    return write_reports(args, result, "loss", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
