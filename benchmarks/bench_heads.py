"""Benchmark fastppo's fused policy heads against torch.distributions in eager and under torch.compile.

Run from the repository root:

    python benchmarks/bench_heads.py                 # full CPU run, writes benchmarks/results/heads_cpu.md
    python benchmarks/bench_heads.py --quick         # smoke run (3 small cases); prints, writes only with --out
    python benchmarks/bench_heads.py --tiny          # smallest size of each head, no torch.compile (a test); same
    python benchmarks/bench_heads.py --threads 4     # torch.set_num_threads(4) and OMP_NUM_THREADS=4 (fastppo)
    python benchmarks/bench_heads.py --device cuda   # CUDA tensors; writes benchmarks/results/heads_cuda.md
    python benchmarks/bench_heads.py --out PATH      # write the Markdown report to PATH
    python benchmarks/bench_heads.py --json PATH     # also write the machine and every row as JSON

Two heads, each returning ``(logprob, entropy)`` per row:

- categorical: ``fastppo.categorical_logprob_entropy(logits, actions)`` with float32 logits
  ``[rows, A]`` and int64 actions ``[rows]``, against ``torch.distributions.Categorical(logits=logits)``
  with ``.log_prob(actions)`` and ``.entropy()``;
- Gaussian: ``fastppo.normal_logprob_entropy(mean, log_std, actions)`` with mean and actions
  ``[rows, D]`` and one log_std ``[D]`` shared by every row (CleanRL's continuous agent), against
  ``torch.distributions.Normal(mean, log_std.exp())`` with ``.log_prob(actions).sum(-1)`` and
  ``.entropy().sum(-1)``.

For each size it times one forward + backward call: the head, then ``torch.autograd.grad`` of
``(logprob * w1 + entropy * w2).sum()`` with respect to the logits (or mean and log_std), with
fixed random weights w1, w2 of ``rows`` elements. Contenders: fastppo; the torch.distributions
function in eager; the same function under ``torch.compile`` (inductor, ``dynamic=False``,
compiled afresh for each size, its first call, the compile, reported in its own table). It also
reports each contender's peak extra memory during one call next to the size of the input
gradients, and checks once per size that fastppo's (and the compiled function's) outputs and
gradients match eager's. It prints a Markdown report (machine, tables, ratios, checks) and writes it.
``collect(args)`` runs the measurements and returns them; ``python -m benchmarks`` uses it through
``--json`` to run this benchmark with the others.
"""

from __future__ import annotations

import os
import sys


try:  # python -m benchmarks.bench_heads
    from benchmarks import bench_loss
    from benchmarks._timing import median_ms
    from benchmarks.bench_gae import (TIMING, bench_parser, machine_head, setup_device, fmt, json_row, ratio,
                                      write_reports)
except ImportError:  # python benchmarks/bench_heads.py
    import bench_loss
    from _timing import median_ms
    from bench_gae import TIMING, bench_parser, machine_head, setup_device, fmt, json_row, ratio, write_reports

# bench_loss's helpers; peak_extra_bytes reads bench_loss's module global ``torch``, set in run().
fmt_bytes = bench_loss.fmt_bytes
peak_extra_bytes = bench_loss.peak_extra_bytes
rel_diff = bench_loss.rel_diff
timed_first_call = bench_loss.timed_first_call

# Imported in main(), after --threads has set OMP_NUM_THREADS (fastppo's OpenMP runtime reads it
# once, when the compiled module is loaded) and after TORCHINDUCTOR_CACHE_DIR is chosen.
torch = None
fastppo = None

CATEGORICAL = "categorical"
GAUSSIAN = "Gaussian"
SIZES = {  # (rows, A) for the categorical head, (rows, D) for the Gaussian head
    CATEGORICAL: [(4096, 6), (4096, 18), (2048, 32000), (256, 131072)],
    GAUSSIAN: [(4096, 6), (4096, 17)],
}
QUICK_SIZES = {CATEGORICAL: [(4096, 6), (64, 32000)], GAUSSIAN: [(4096, 6)]}
TINY_SIZES = {head: [min(sizes, key=lambda size: size[0] * size[1])] for head, sizes in SIZES.items()}
WARMUP_COMPILE_SIZE = (8, 4)  # compiled once per head first, untimed in the tables
TOLERANCE = 1e-4  # relative difference allowed between fastppo's outputs / gradients and eager's

FASTPPO = "fastppo"
EAGER = "torch.distributions eager"
COMPILED = "torch.distributions torch.compile"
CONTENDERS = [FASTPPO, EAGER, COMPILED]
PEER_BASELINES = {EAGER: FASTPPO, COMPILED: FASTPPO}  # each peer and the column its speed-up is taken against
NOT_COMPILED = "not run (--tiny)"  # --tiny leaves torch.compile out
KERNELS = {CATEGORICAL: "categorical_logprob_entropy", GAUSSIAN: "normal_logprob_entropy"}  # fastppo's names
GRADS = "gradient size"  # bytes of the returned gradients: rows*A*4, or rows*D*4 + D*4

# Measured before this benchmark existed (the numbers, this machine, an earlier run): ms.
REFERENCE_MS = {
    (CATEGORICAL, 4096, 6): (0.91, 0.33),
    (CATEGORICAL, 4096, 18): (1.27, 0.70),
    (CATEGORICAL, 2048, 32000): (1579, 254),
    (CATEGORICAL, 256, 131072): (731, 155),
    (GAUSSIAN, 4096, 6): (0.67, None),
    (GAUSSIAN, 4096, 17): (0.94, None),
}


# --- The peers, written out plainly --------------------------------------------------------------
#
# validate_args=False is explicit: torch.compile's first call turns torch.distributions' argument
# validation off for the whole process (dynamo's TorchPatcher), so the eager peer would otherwise
# validate or not depending on whether anything was compiled before it; this way eager and
# compiled run the same code.


def torch_categorical(logits, actions):
    dist = torch.distributions.Categorical(logits=logits, validate_args=False)
    return dist.log_prob(actions), dist.entropy()


def torch_normal(mean, log_std, actions):
    dist = torch.distributions.Normal(mean, log_std.exp(), validate_args=False)
    return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)


def fastppo_categorical(logits, actions):
    return fastppo.categorical_logprob_entropy(logits, actions)


def fastppo_normal(mean, log_std, actions):
    return fastppo.normal_logprob_entropy(mean, log_std, actions)


PEERS = {CATEGORICAL: torch_categorical, GAUSSIAN: torch_normal}
FASTPPO_FNS = {CATEGORICAL: fastppo_categorical, GAUSSIAN: fastppo_normal}
GRAD_NAMES = {CATEGORICAL: ["grad logits"], GAUSSIAN: ["grad mean", "grad log_std"]}


# --- Inputs and contenders -----------------------------------------------------------------------


def make_inputs(head, rows, n, device, seed):
    """``(args, params, w1, w2)``: the head's arguments, its differentiable leaves, the weights.

    Categorical: logits = 2 N(0, 1) (float32 [rows, A]), actions uniform in [0, A) (int64).
    Gaussian: mean ~ N(0, 1) [rows, D], log_std = -0.5 + 0.2 N(0, 1) [D], actions sampled from the
    policy (mean + exp(log_std) N(0, 1)). w1, w2 ~ N(0, 1) [rows].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    if head == CATEGORICAL:
        logits = (2 * randn(rows, n)).to(device).requires_grad_(True)
        actions = torch.randint(0, n, (rows,), generator=g, dtype=torch.int64).to(device)
        args, params = (logits, actions), [logits]
    else:
        mean = randn(rows, n)
        log_std = -0.5 + 0.2 * randn(n)
        actions = (mean + log_std.exp() * randn(rows, n)).to(device)
        mean = mean.to(device).requires_grad_(True)
        log_std = log_std.to(device).requires_grad_(True)
        args, params = (mean, log_std, actions), [mean, log_std]
    w1, w2 = randn(rows).to(device), randn(rows).to(device)
    return args, params, w1, w2


def step_call(head_fn, inputs):
    """The timed call: the head, then the gradients of the weighted sum w.r.t. its leaves."""
    args, params, w1, w2 = inputs

    def call():
        logprob, entropy = head_fn(*args)
        grads = torch.autograd.grad((logprob * w1 + entropy * w2).sum(), params)
        return logprob.detach(), entropy.detach(), grads

    return call


def check(column, outputs, reference, head, label):
    """Compares (logprob, entropy, grads) with the eager reference; returns warning lines."""
    names = ["logprob", "entropy"] + GRAD_NAMES[head]
    got = [outputs[0], outputs[1]] + list(outputs[2])
    ref = [reference[0], reference[1]] + list(reference[2])
    warnings = []
    for name, a, b in zip(names, got, ref):
        if a.shape != b.shape:
            warnings.append(f"WARNING {label}: {column} {name} has shape {tuple(a.shape)}, {EAGER} {tuple(b.shape)}")
            continue
        diff = rel_diff(a.detach().double(), b.detach().double())
        if not diff <= TOLERANCE:  # also catches NaN
            warnings.append(
                f"WARNING {label}: {column} {name} differs from {EAGER} by {diff:.3g} relative (tolerance {TOLERANCE:g})"
            )
    return warnings


def compile_head(fn):
    """A fresh compiled function; dynamo's caches are cleared first, so the next call compiles."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def grad_bytes(inputs):
    return sum(p.numel() * p.element_size() for p in inputs[1])


# --- Report --------------------------------------------------------------------------------------


def repay_calls(row):
    """Calls after which compiling has paid for itself against eager, or a reason it never does."""
    first, eager, compiled = row.get("compile"), row.get(EAGER), row.get(COMPILED)
    if not all(isinstance(x, float) for x in (first, eager, compiled)):
        return "-"
    if compiled >= eager:
        return "never"
    return f"{max(first - eager, 0.0) / (eager - compiled):.0f}"


def machine_lines(device, compile_info):
    lines = machine_head(device, torch, fastppo)
    lines += [
        f"- torch.compile: {compile_info}",
    ]
    return lines


def reference_line(head, rows, n):
    eager, compiled = REFERENCE_MS[(head, rows, n)]
    text = f"{head} ({rows}, {n}): eager {fmt(eager)} ms"
    return text + (f", torch.compile {fmt(compiled)} ms" if compiled is not None else "")


def report(result):
    rows, device, mode, sizes = result["rows"], result["device"], result["mode"], result["sizes"]
    warnings = result["warnings"]
    key_header = "| head | rows | A or D | "
    key_rule = "|:---|---:|---:|"

    def key_cells(key):
        head, n_rows, n = key
        return [head, str(n_rows), str(n)]

    ratio_columns = [(f"{EAGER} / {FASTPPO}", EAGER, FASTPPO), (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO)]
    lines = [f"# fastppo policy heads benchmark ({device})", ""]
    shown = "; ".join(f"{head} (rows, {'A' if head == CATEGORICAL else 'D'}) in {s}" for head, s in sizes.items())
    if mode == "quick":
        lines += [f"**Quick smoke run (--quick): {shown}, about 20 ms of timed calls per case; not a measurement.**", ""]
    elif mode == "tiny":
        lines += [f"**Tiny run (--tiny): {shown}, 3 timed calls per case, no torch.compile; a test of this script, "
                  "not a measurement.**", ""]
    lines += ["## Machine", ""] + machine_lines(device, result["compile_info"]) + [""]
    lines += [
        "## Median time per forward + backward call (ms, lower is better)",
        "",
        key_header + " | ".join(CONTENDERS + [name for name, _, _ in ratio_columns]) + " |",
        key_rule + "---:|" * (len(CONTENDERS) + len(ratio_columns)),
    ]
    for key, row in rows.items():
        cells = key_cells(key) + [fmt(row[c]) for c in CONTENDERS]
        cells += [ratio(row, num, den) for _, num, den in ratio_columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    lines += [f"**{w}**" for w in warnings] or [
        "Checks: at every size, fastppo's "
        + ("" if mode == "tiny" else "and the compiled function's ")
        + f"log-prob, entropy and gradients matched "
        f"{EAGER}'s to {TOLERANCE:g} relative (max |difference| / max |eager|)."
    ]
    lines += [
        "",
        f"## {COMPILED}: compile time (first call at each size, not in the table above)",
        "",
        key_header + "first call (s) | later calls (ms) | calls until compiling repays vs eager |",
        key_rule + "---:|---:|---:|",
    ]
    for key, row in rows.items():
        first = row["compile"]
        cells = key_cells(key) + [
            fmt(first / 1e3) if isinstance(first, float) else first, fmt(row[COMPILED]), repay_calls(row)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    mem_ratio_columns = [
        (f"{FASTPPO} / {GRADS}", FASTPPO, GRADS),
        (f"{EAGER} / {FASTPPO}", EAGER, FASTPPO),
        (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO),
    ]
    lines += [
        "",
        "## Peak extra memory during one forward + backward call (lower is better)",
        "",
        key_header + " | ".join(CONTENDERS + [GRADS] + [name for name, _, _ in mem_ratio_columns]) + " |",
        key_rule + "---:|" * (len(CONTENDERS) + 1 + len(mem_ratio_columns)),
    ]
    for key, row in rows.items():
        mem = dict(row["memory"], **{GRADS: row["grad_bytes"]})
        cells = key_cells(key) + [fmt_bytes(mem[c]) for c in CONTENDERS + [GRADS]]
        cells += [ratio({k: float(v) if isinstance(v, int) else v for k, v in mem.items()}, num, den)
                  for _, num, den in mem_ratio_columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Notes",
        "",
        "- Reference, measured before fastppo's heads existed (earlier measurements on this machine, not this run): "
        + "; ".join(reference_line(*key) for key in REFERENCE_MS)
        + ".",
        "- Inputs: categorical: float32 logits = 2 N(0,1) of [rows, A], int64 actions uniform in [0, A); Gaussian: "
        "float32 mean ~ N(0,1) of [rows, D], one log_std = -0.5 + 0.2 N(0,1) of [D] shared by every row (as CleanRL's "
        "continuous agent learns it), actions sampled from that policy. The logits (or mean and log_std) are leaves "
        "with requires_grad; w1, w2 ~ N(0,1) of [rows] are made once per size, before timing.",
        "- Timed call: the head's forward (log-prob and entropy per row; the Gaussian's summed over D), then "
        "`torch.autograd.grad((logprob * w1 + entropy * w2).sum(), [logits])` (or `[mean, log_std]`); the weighted "
        "sum runs in eager for every contender. Each contender is timed in its own block of consecutive calls; each "
        "case is the median of "
        + {
            "full": "the calls that fit in about 0.5 s, but at least 3 (a call of a second or more is timed "
            "3 times), after 2 warm-up calls.",
            "quick": "the calls that fit in about 20 ms (at least 1), after 1 warm-up call.",
            "tiny": "3 calls, after 1 warm-up call.",
        }[mode],
        f"- `{FASTPPO}`: `fastppo.categorical_logprob_entropy(logits, actions)` (temperature 1) and "
        "`fastppo.normal_logprob_entropy(mean, log_std, actions)`.",
        f"- `{EAGER}`: `Categorical(logits=logits)` with `.log_prob(actions)`, `.entropy()`; "
        "`Normal(mean, log_std.exp())` with `.log_prob(actions).sum(-1)`, `.entropy().sum(-1)`; both with "
        "`validate_args=False`, explicitly: torch.compile's first call turns validation off for the whole process "
        "anyway, and this keeps eager and compiled running the same code (a script that never compiles validates "
        "by default, which adds a pass over the inputs).",
        f"- `{COMPILED}`: the same function under `torch.compile(..., dynamic=False)` (inductor). Dynamo's caches "
        "are reset before each size, so each size compiles once, forward and backward graphs, with one cache entry "
        "in use while it is timed. Its first call at each size (the compile, measured with time.perf_counter) is "
        "the compile table's column; a one-time warm-up compile of each head at (rows, A or D) = "
        f"{WARMUP_COMPILE_SIZE} first absorbs process-wide setup (imports, compile workers).",
        (
            "- fastppo's CPU kernels run on the OpenMP threads shown by build_info(); eager torch ops and "
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
        f"- `{GRADS}`: the bytes of the returned gradients, rows * A * 4 for the logits' gradient (rows * D * 4 + "
        "D * 4 for mean's and log_std's); they are part of every contender's figure. fastppo's target is no more "
        f"than this plus O(rows) (its two outputs and the weighted sum's arrays of rows elements): "
        f"`{FASTPPO} / {GRADS}` near 1 at large A.",
    ]
    return "\n".join(lines) + "\n"


# --- JSON ----------------------------------------------------------------------------------------


def to_json(result):
    """This benchmark's summary and rows (one kernel per head), for bench_gae's ``json_document``."""
    rows = []
    for (head, n_rows, n), row in result["rows"].items():
        n_name = "A" if head == CATEGORICAL else "D"
        case, size = f"rows={n_rows}, {n_name}={n}", {"rows": n_rows, n_name: n}
        rows.append(json_row(
            KERNELS[head], case, size, row, [FASTPPO], PEER_BASELINES,
            compile_first_call_ms=row["compile"], peak_extra_bytes=row["memory"], gradient_bytes=row["grad_bytes"],
        ))
    return {
        "name": "heads",
        "title": "fastppo policy heads (forward + backward)",
        "script": "benchmarks/bench_heads.py",
        "warnings": result["warnings"],
        "details": {"torch_compile": result["compile_info"], "tolerance": TOLERANCE},
        "rows": rows,
    }


# --- Main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    return bench_parser(__doc__.splitlines()[0], "heads", "smoke run: 3 small cases and tiny repeat counts",
                        "smallest size of each head, 3 timed calls, no torch.compile: a test").parse_args(argv)


def collect(args):
    """Runs the benchmark that ``args`` (from parse_args) describes and returns its measurements."""
    return bench_loss.with_cold_compile_cache(args, "bench_heads_inductor_", measure)


def measure(args, own_cache):
    global torch, fastppo
    import torch
    import torch._dynamo
    import fastppo

    bench_loss.torch, bench_loss.fastppo = torch, fastppo  # for the helpers borrowed from it
    device, mode = setup_device(args, torch, fastppo)
    sizes = {"full": SIZES, "quick": QUICK_SIZES, "tiny": TINY_SIZES}[mode]
    compiling = mode != "tiny"

    sync = torch.cuda.synchronize if device == "cuda" else None
    # Each contender is called once (checked, and for torch.compile, compiled) before it is timed:
    # that call is its first warm-up. A full run times about 0.5 s per case but never fewer than 3
    # calls, so a call of over a second (eager at the large vocabularies) is timed 3 times.
    timing = TIMING[mode]

    if compiling:
        # One-time costs of the first compile in a process (imports, worker pool), kept out of the tables.
        warm = []
        for head, peer in PEERS.items():
            warm_inputs = make_inputs(head, *WARMUP_COMPILE_SIZE, device, seed=0)
            _, warm_ms = timed_first_call(step_call(compile_head(peer), warm_inputs), sync)
            print(f"warm-up compile, {head} at {WARMUP_COMPILE_SIZE}: {warm_ms / 1e3:.1f} s", file=sys.stderr)
            warm.append(f"{head} {warm_ms / 1e3:.1f} s")
        compile_info = (
            "inductor, dynamic=False, recompiled for each size; "
            + ("fresh (empty) inductor cache dir for this run" if own_cache
               else f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (may be warm)")
            + f"; one-time warm-up compiles at {WARMUP_COMPILE_SIZE}: " + ", ".join(warm)
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
    for head, head_sizes in sizes.items():
        for n_rows, n in head_sizes:
            label = f"{head} ({n_rows}, {n})"
            inputs = make_inputs(head, n_rows, n, device, seed=n_rows * 1_000_003 + n)
            calls = {FASTPPO: step_call(FASTPPO_FNS[head], inputs), EAGER: step_call(PEERS[head], inputs)}
            reference = calls[EAGER]()
            warnings += check(FASTPPO, calls[FASTPPO](), reference, head, label)
            row = {"compile": NOT_COMPILED, "grad_bytes": grad_bytes(inputs)}
            if compiling:
                calls[COMPILED] = step_call(compile_head(PEERS[head]), inputs)
                compiled_out, row["compile"] = timed_first_call(calls[COMPILED], sync)
                warnings += check(COMPILED, compiled_out, reference, head, label)
                del compiled_out
                print(f"{label:26s} {'compile (first call)':34s} {fmt(row['compile']):>10s} ms", file=sys.stderr)
            del reference
            for column in CONTENDERS:
                row[column] = median_ms(calls[column], sync=sync, **timing) if column in calls else NOT_COMPILED
                print(f"{label:26s} {column:34s} {fmt(row[column]):>10s} ms", file=sys.stderr)
            row["memory"] = {
                column: peak_extra_bytes(calls[column], device) if column in calls else NOT_COMPILED
                for column in CONTENDERS
            }
            print(f"{label:26s} peak extra memory: "
                  + ", ".join(f"{c} {fmt_bytes(m)}" for c, m in row["memory"].items())
                  + f" ({GRADS} {fmt_bytes(row['grad_bytes'])})", file=sys.stderr)
            rows[(head, n_rows, n)] = row
            del calls, inputs
    for w in warnings:
        print(w, file=sys.stderr)
    return dict(device=device, mode=mode, sizes=sizes, rows=rows, compile_info=compile_info, warnings=warnings)


def main(argv=None):
    args = parse_args(argv)
    result = collect(args)
    return write_reports(args, result, "heads", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
