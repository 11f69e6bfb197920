"""What fastppo's micro-benchmarks share: timing, checks, memory, the machine, the command line,
the reports (Markdown, JSON, the speed-up chart) and the reading of pytest-benchmark's JSON.

Each micro-benchmark (bench_gae.py, bench_loss.py, bench_heads.py, bench_rlhf.py) keeps only its
own kernel's cases and the peers no test needs; the peers the tests check the kernels against
(CleanRL's GAE loop and loss lines, torch.distributions' heads, SB3's GAE) come from tests/peers.py
(``import_peers``). Each runs on its own from the repository root and takes the same options:

    python -m benchmarks.bench_gae               # full CPU run, writes benchmarks/results/gae_cpu.md
    python -m benchmarks.bench_gae --quick       # seconds-long smoke run; prints, writes only with --out
    python -m benchmarks.bench_gae --tiny        # smallest sizes, 3 timed calls, no torch.compile (a test)
    python -m benchmarks.bench_gae --threads 4   # torch.set_num_threads(4) and OMP_NUM_THREADS=4 (fastppo)
    python -m benchmarks.bench_gae --device cuda # CUDA tensors; the report is gae_cuda.md
    python -m benchmarks.bench_gae --out PATH    # write the Markdown report to PATH
    python -m benchmarks.bench_gae --json PATH   # also write the machine and every row as JSON

The same cases also run under pytest-benchmark (``pytest benchmarks --benchmark-only``, see
benchmarks/test_kernels.py), whose ``--benchmark-json`` file ``python -m benchmarks --from-json``
turns into the suite's tables and chart.

torch and fastppo are imported inside the functions that need them: a script imports them only
after ``--threads`` has set OMP_NUM_THREADS, which fastppo's OpenMP runtime reads once, when the
compiled module loads.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# Timed calls per case for each run mode (median_ms's arguments). Each contender is also called once
# before it is timed (the check), which serves as its first warm-up.
TIMING = {
    "full": dict(repeats=None, warmup=1, budget_s=0.5, min_repeats=3),  # about 0.5 s, at least 3 calls
    "quick": dict(repeats=None, warmup=0, budget_s=0.02, min_repeats=1),  # about 20 ms, at least 1 call
    "tiny": dict(repeats=3, warmup=0),  # exactly 3 calls
}
TIMING_NOTES = {  # "each case is the median of ..."
    "full": "the calls that fit in about 0.5 s, but at least 3 (a call of a second or more is timed 3 times), "
    "after 2 warm-up calls (the check and one more).",
    "quick": "the calls that fit in about 20 ms (at least 1), after 1 warm-up call (the check).",
    "tiny": "3 calls, after 1 warm-up call (the check).",
}
NOT_COMPILED = "not run (--tiny)"  # --tiny leaves torch.compile out


# --- Timing ---------------------------------------------------------------------------------------


def median_ms(fn, repeats=None, warmup=1, *, budget_s=0.5, min_repeats=3, max_repeats=10_000, sync=None):
    """Median wall time of one call of ``fn()``, in milliseconds.

    ``warmup`` untimed calls first; then calls timed one at a time with ``time.perf_counter``:
    exactly ``repeats`` of them, or with ``repeats=None`` until they add up to ``budget_s`` seconds
    (never fewer than ``min_repeats`` nor more than ``max_repeats``: a fast call is timed thousands
    of times, a call of seconds ``min_repeats`` times). ``sync`` (e.g. ``torch.cuda.synchronize``)
    is called before each clock start and, inside the timed region, after ``fn``.
    """
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    if repeats is not None:
        min_repeats = max_repeats = repeats
    times = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one call would only add noise
    try:
        while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times) * 1e3


def timed_first_call(call, sync):
    """``(call(), its wall time in ms)``: a torch.compile'd function's first call is its compile."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    out = call()
    if sync is not None:
        sync()
    return out, (time.perf_counter() - start) * 1e3


def median(values):
    """The median of the values that are not None, or None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- Peers and checks -----------------------------------------------------------------------------


def import_peer(name):
    """The module ``name``, or why a peer needing it cannot run: "not installed" or "import failed (...)"."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken: say so in the table rather than crash
        return f"import failed ({type(exc).__name__})"


PEERS_FILE = Path(__file__).resolve().parents[1] / "tests" / "peers.py"


def import_peers():
    """tests/peers.py, the peers as users write them, shared with the tests (which import it as
    ``peers``: the same module object here). It imports torch and fastppo: call it after ``threads_env``."""
    module = sys.modules.get("peers")
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == PEERS_FILE:
        return module
    spec = importlib.util.spec_from_file_location("peers", PEERS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault("peers", module)
    return module


def compile_fresh(fn):
    """``torch.compile(fn, dynamic=False)`` with dynamo's caches cleared first, so its next call compiles."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _float64(x):
    return x.detach().double() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def compare(got, ref, column, ref_column, label, tolerance, relative=True):
    """``(warning lines, {output: difference})`` for each output of ``got`` against ``ref`` (dicts of
    numpy arrays or tensors): max |got - ref|, divided by max |ref| when ``relative``."""
    warnings, diffs = [], {}
    for name, b in ref.items():
        a = got[name]
        if tuple(a.shape) != tuple(b.shape):
            warnings.append(f"WARNING {label}: {column} {name} has shape {tuple(a.shape)}, "
                            f"{ref_column} {tuple(b.shape)}")
            continue
        a, b = _float64(a), _float64(b)
        diff = float(abs(a - b).max())
        if relative:
            diff /= max(float(abs(b).max()), 1e-30)
        diffs[name] = diff
        if not diff <= tolerance:  # also catches NaN
            warnings.append(f"WARNING {label}: {column} {name} differs from {ref_column} by {diff:.3g}"
                            + (" relative" if relative else "") + f" (tolerance {tolerance:g})")
    return warnings, diffs


@dataclass
class Contenders:
    """One case's contenders: ``calls[column]`` is the call to time, or why that column cannot run
    here; ``outputs_of(column, result)`` turns a call's result into ``{output name: array or tensor}``
    (None: the result already is); every column is checked against ``reference``'s outputs."""

    calls: dict
    reference: str
    tolerance: float
    relative: bool = True
    outputs_of: Optional[Callable] = None

    def outputs(self, column, result):
        return result if self.outputs_of is None else self.outputs_of(column, result)

    def runnable(self):
        return {column: call for column, call in self.calls.items() if not isinstance(call, str)}

    def check(self, label, first_call=lambda column, call: call()):
        """Calls each runnable column once (the reference first; ``first_call(column, call)`` makes
        the call) and compares it with the reference: ``(warning lines, {column: {output: diff}})``."""
        calls = self.runnable()
        ref = self.outputs(self.reference, first_call(self.reference, calls[self.reference]))
        warnings, diffs = [], {}
        for column, call in calls.items():
            if column != self.reference:
                got = self.outputs(column, first_call(column, call))
                w, diffs[column] = compare(got, ref, column, self.reference, label, self.tolerance, self.relative)
                warnings += w
        return warnings, diffs


# --- Memory ---------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Starts the process's peak resident set (VmHWM) again from its resident set now (Linux >= 4.0,
    /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(call, device):
    """Peak bytes allocated during one ``call()`` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before the call. CPU: torch.profiler with profile_memory=True records every allocation and
    free made through torch's CPU allocator; the peak is the largest running sum of their sizes,
    in time order. Either way the returned outputs count (they are allocated during the call).
    """
    import torch

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


def measure_case(contenders, device, label, sync, timing, warnings, memory=True):
    """One case's row. Every runnable contender is first checked against the reference (that call,
    timed, is its first warm-up, and a torch.compile'd function's compile), then timed, and with
    ``memory`` its peak extra memory measured. The row maps each column to its median ms (or why
    it cannot run), and "first_call_ms", "max_rel_diff" and "memory" to those figures per column;
    the check's warnings are appended to ``warnings``."""
    first_call_ms = {}

    def first_call(column, call):
        out, first_call_ms[column] = timed_first_call(call, sync)
        return out

    check_warnings, diffs = contenders.check(label, first_call)
    warnings += check_warnings
    gc.collect()
    row = {"first_call_ms": first_call_ms, "max_rel_diff": diffs, "memory": {}}
    for column, call in contenders.calls.items():
        row[column] = call if isinstance(call, str) else median_ms(call, sync=sync, **timing)
        line = f"{label:30s} {column:40s} {fmt(row[column]):>10s} ms"
        if memory:
            row["memory"][column] = call if isinstance(call, str) else peak_extra_bytes(call, device)
            line += f"  peak {fmt_bytes(row['memory'][column])}"
        print(line, file=sys.stderr)
    return row


def copy_bandwidth(device, mode):
    """Bytes per second moved by copying a large buffer (each copy reads and writes it)."""
    nbytes, repeats = (256 << 20, None) if mode == "full" else (64 << 20, 3)
    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.ones_like(src)  # written, so the timed copies take no page faults
        ms = median_ms(lambda: np.copyto(dst, src), repeats, warmup=1)
    else:
        import torch

        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.ones_like(src)
        ms = median_ms(lambda: dst.copy_(src), repeats, warmup=1, sync=torch.cuda.synchronize)
    bandwidth = 2 * nbytes / (ms / 1e3)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    return bandwidth


# --- Formatting -----------------------------------------------------------------------------------


def fmt(x):
    if isinstance(x, str):
        return x
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def fmt_bytes(x):
    if isinstance(x, str):
        return x
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= scale * (1000 / 1024 if unit == "GiB" else 1):  # GiB from 1000 MiB on
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def ratio(row, num, den):
    a, b = row.get(num), row.get(den)
    if isinstance(a, int) and isinstance(b, int):  # byte counts
        a, b = float(a), float(b)
    if not isinstance(a, float) or not isinstance(b, float):
        return "-"
    return fmt(a / b)


def table(header, rule, rows):
    """Markdown lines: the header cells, the rule ("|---:|..."), one line per list of cells."""
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(cells) + " |" for cells in rows]


def mode_banner(mode, shown, compiles=False):
    """The bold line a quick or tiny report starts with (none for a full run); ``shown`` names the
    sizes; ``compiles``: the script has torch.compile peers, which --tiny leaves out."""
    if mode == "quick":
        return [f"**Quick smoke run (--quick): {shown}, about 20 ms of timed calls per case; not a measurement.**", ""]
    if mode == "tiny":
        return [f"**Tiny run (--tiny): {shown}, 3 timed calls per case{', no torch.compile' if compiles else ''}; "
                "a test of this script, not a measurement.**", ""]
    return []


def threads_note(device, cpu_text):
    """Where a run's threads come from (CPU), or that every CUDA call is synchronized."""
    if device == "cpu":
        return f"- fastppo's CPU kernels run on the OpenMP threads shown by build_info(); {cpu_text}."
    return "- CUDA: every timed call is followed by torch.cuda.synchronize(), inside the timed region."


def memory_note(device):
    if device == "cpu":
        return ("- Memory (CPU): `torch.profiler.profile(profile_memory=True)` around one call records each allocation "
                "and free made through torch's CPU allocator; the figure is the largest running sum of those sizes "
                "in time order, i.e. the peak bytes held above what was held before the call (outputs included). "
                "Memory a kernel allocates on its own (malloc, std::vector) is not seen.")
    return ("- Memory (CUDA): `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus "
            "`memory_allocated()` before the call (tensors from torch's caching allocator, not its reserved pool).")


def bandwidth_line(device, bandwidth):
    how = ("np.copyto of a large buffer, one thread" if device == "cpu" else "device-to-device Tensor.copy_")
    return f"- Copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({how}, counting read + write)"


# --- torch.compile peers --------------------------------------------------------------------------


def with_cold_compile_cache(args, prefix, measure_fn):
    """Applies --threads, then runs ``measure_fn(args, own_cache)`` with inductor's on-disk caches
    starting empty (a cold compile), unless the caller chose TORCHINDUCTOR_CACHE_DIR."""
    threads_env(args)
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=prefix)
    try:
        return measure_fn(args, own_cache)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)


def compile_info(device, own_cache, each, at, warm_calls, sync):
    """Makes the one-time warm-up compiles (``warm_calls``: {name: first call of a fresh compiled
    function}, at size ``at``), which absorb process-wide setup (imports, compile workers) and stay
    out of the tables; returns the report's torch.compile line."""
    warm = []
    for name, call in warm_calls.items():
        seconds = timed_first_call(call, sync)[1] / 1e3
        print(f"warm-up compile {name} at {at}: {seconds:.1f} s", file=sys.stderr)
        warm.append(f"{name} {seconds:.1f} s".strip())
    text = (f"inductor, dynamic=False, recompiled for each {each}; "
            + ("fresh (empty) inductor cache dir for this run" if own_cache
               else f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (may be warm)")
            + f"; one-time warm-up compile{'s' if len(warm) > 1 else ''} at {at}: {', '.join(warm)}")
    if device == "cuda":
        triton = import_peer("triton")
        if not isinstance(triton, str):
            text += f"; triton {triton.__version__}"
    return text


def compile_table(rows, key_cells, header, rule, eager, compiled):
    """The compile-time table: first call (s), later calls (ms), and the calls after which compiling
    has paid for itself against eager (or "never")."""
    cells = []
    for key, row in rows.items():
        first, eager_ms, compiled_ms = row["compile"], row[eager], row[compiled]
        repay = "-"
        if all(isinstance(x, float) for x in (first, eager_ms, compiled_ms)):
            repay = "never" if compiled_ms >= eager_ms else f"{max(first - eager_ms, 0) / (eager_ms - compiled_ms):.0f}"
        first = fmt(first / 1e3) if isinstance(first, float) else first
        cells.append(key_cells(key) + [first, fmt(compiled_ms), repay])
    return table(header + ["first call (s)", "later calls (ms)", "calls until compiling repays vs eager"],
                 rule + "---:|---:|---:|", cells)


# --- The machine ----------------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_head(machine, versions="", peer_line=None):
    """The machine lines every report starts with, from ``machine_info``: date, CPU, GPU, versions
    (``versions`` names the peers' libraries, ending with ", "), an optional peer line, threads, build."""
    lines = [f"- Date: {machine['date']}", f"- CPU: {machine['cpu']}, {machine['logical_cores']} logical cores "
             f"({machine['usable_cores']} usable by this process)"]
    if machine["device"] == "cuda":
        lines.append(f"- GPU: {machine['gpu']} (torch CUDA {machine['torch_cuda']})")
    lines.append(f"- Python {machine['python']}, numpy {machine['numpy']}, torch {machine['torch']} "
                 f"({machine['torch_threads']} threads), {versions}fastppo {machine['fastppo']}")
    return lines + ([] if peer_line is None else [peer_line]) + [
        f"- OMP_NUM_THREADS: {machine['omp_num_threads'] or 'unset'}",
        f"- fastppo.build_info(): `{machine['fastppo_build_info']}`",
    ]


def machine_info(device):
    """The machine and the library versions, as a dict for the JSON results."""
    import torch
    import fastppo

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
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


# --- The command line -----------------------------------------------------------------------------


def bench_parser(description, name):
    """The command line every benchmark script shares; ``name`` picks the default report file."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seconds-long smoke run: fewer sizes, about 20 ms per case")
    size.add_argument("--tiny", action="store_true", help="smallest sizes, 3 timed calls, no torch.compile: a test")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads, and OMP_NUM_THREADS for fastppo")
    parser.add_argument("--out", type=Path, help="Markdown file to write (default benchmarks/results/"
                        f"{name}_<device>.md; --quick and --tiny write only with --out)")
    parser.add_argument("--json", type=Path, help="also write the machine and every row to this JSON file")
    return parser


def threads_env(args):
    """Before torch and fastppo are imported: --threads becomes OMP_NUM_THREADS."""
    if args.threads is not None:
        if args.threads < 1:
            sys.exit("error: --threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)


def setup_device(args):
    """After the imports: torch's thread count, and a clear exit when --device cuda cannot run.
    Returns (device, mode, sync): sync is torch.cuda.synchronize on CUDA, else None."""
    import torch
    import fastppo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
        if not fastppo.cuda_available():
            sys.exit(f"error: --device cuda, but this fastppo build cannot run on CUDA: {fastppo.build_info()}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    return args.device, mode, torch.cuda.synchronize if args.device == "cuda" else None


# --- JSON -----------------------------------------------------------------------------------------


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
            if isinstance(row.get(base), float):
                entry["speedup"] = row[peer] / row[base]
        else:
            entry["skipped"] = row[peer]
        peer_entries.append(entry)
    return {
        "kernel": kernel,
        "case": case,
        "size": size,
        "fastppo_ms": {c: row[c] for c in fastppo_columns if isinstance(row.get(c), float)},
        "fastppo_skipped": {c: row.get(c, "-") for c in fastppo_columns if not isinstance(row.get(c), float)},
        "peers": peer_entries,
        **extra,
    }


def write_reports(args, result, name, text, row_document):
    """Prints the checks' warnings and the Markdown report, writes the report (a full run: to
    benchmarks/results/ by default) and, with --json, the machine and rows."""
    for warning in row_document["warnings"]:
        print(warning, file=sys.stderr)
    out = args.out if args.out is not None or result["mode"] != "full" else RESULTS / f"{name}_{args.device}.md"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(row, benchmark=row_document["name"]) for row in row_document["rows"]]
        summary = {k: v for k, v in row_document.items() if k != "rows"}
        document = dict(machine=result["machine"], device=args.device, mode=result["mode"], benchmarks=[summary],
                        rows=rows)
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# --- pytest-benchmark -----------------------------------------------------------------------------


@dataclass
class Case:
    """One size of one kernel for the pytest benchmarks (benchmarks/test_kernels.py).

    ``vs`` maps every column to the fastppo column its speed-up is taken against (None for
    fastppo's own columns); ``build()`` makes the inputs and returns the case's Contenders.
    """

    benchmark: str
    kernel: str
    case: str
    size: dict
    vs: dict
    build: Callable[[], Contenders]


def document_from_pytest(report):
    """The suite's results document (as ``python -m benchmarks`` writes it) from the JSON that
    ``pytest benchmarks --benchmark-json`` writes: one row per (kernel, case), the median of each
    column's rounds in ms, the speed-ups, and the reason for each column that was skipped."""
    machine = report["machine_info"]["fastppo"]
    cells = {}  # (benchmark, kernel, case) -> {"size", "vs", "row"}
    entries = [(b["extra_info"], b["stats"]["median"] * 1e3) for b in report["benchmarks"]]
    entries += [(skipped, skipped["reason"]) for skipped in report.get("skipped", [])]
    for info, value in entries:
        cell = cells.setdefault((info["benchmark"], info["kernel"], info["case"]),
                                {"size": info["size"], "vs": {}, "row": {}})
        cell["vs"][info["column"]] = info["vs"]
        cell["row"][info["column"]] = value
    rows, names = [], {}
    for (benchmark, kernel, case), cell in cells.items():
        fastppo_columns = [c for c, vs in cell["vs"].items() if vs is None]
        peers = {c: vs for c, vs in cell["vs"].items() if vs is not None}
        row = json_row(kernel, case, cell["size"], cell["row"], fastppo_columns, peers)
        rows.append(dict(row, benchmark=benchmark))
        names[benchmark] = None
    benchmarks = [{"name": name, "title": f"benchmarks/bench_{name}.py's cases under pytest-benchmark",
                   "script": "benchmarks/test_kernels.py", "warnings": [], "report": None} for name in names]
    return {"machine": machine, "device": machine["device"], "mode": "pytest-benchmark", "benchmarks": benchmarks,
            "rows": rows}


# --- The speed-up chart ---------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kernel_groups(rows):
    """``[(title, rows)]``: the rows of each kernel, titled ``fastppo.<kernel>`` (followed by the
    benchmark's name where two benchmarks time the same kernel)."""
    keys = list(dict.fromkeys((row.get("benchmark"), row["kernel"]) for row in rows))
    shared = {kernel for _, kernel in keys if sum(k == kernel for _, k in keys) > 1}
    return [(f"fastppo.{kernel}" + (f" ({bench})" if kernel in shared else ""),
             [row for row in rows if (row.get("benchmark"), row["kernel"]) == (bench, kernel)])
            for bench, kernel in keys]


def plot_speedups(document, path):
    """Writes the speed-up chart of a suite results document to ``path``.

    One panel per kernel; along the x axis the kernel's cases, and at each case one bar per peer:
    fastppo's speed-up over that peer (peer time / fastppo time) on a log scale. Bars start at 1:
    a bar going up means fastppo is faster. Peers skipped at every case are listed under the title.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = pyplot()
    groups = kernel_groups(document["rows"])
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], groups):
        series, reasons = {}, {}  # (peer, vs) -> speed-up per row; peer -> why it was skipped
        for i, row in enumerate(rows):
            for entry in row["peers"]:
                series.setdefault((entry["name"], entry["vs"]), [None] * len(rows))[i] = entry.get("speedup")
                if "skipped" in entry:
                    reasons.setdefault(entry["name"], entry["skipped"])
        measured = {name for (name, _), values in series.items() if any(v is not None for v in values)}
        series = {key: values for key, values in series.items() if key[0] in measured}
        several_fastppo = len({vs for _, vs in series}) > 1  # then each label says which fastppo it divides by
        width = 0.8 / max(len(series), 1)
        every_value = [1.0]
        for i, ((name, vs), values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            xs = [j + offset for j, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            every_value += ys
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=f"{name} / {vs}" if several_fastppo else name)
            ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=7, padding=2)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(min(every_value) / 2, max(every_value) * 3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(rows)), [row["case"] for row in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel("speed-up (peer / fastppo)")
        skipped = {name: reason for name, reason in reasons.items() if name not in measured}
        if skipped:
            title += "\nnot measured: " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items())
        ax.set_title(title, fontsize=10)
        if series:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no peer measured", transform=ax.transAxes, ha="center", va="center")
    mode = document["mode"]
    fig.suptitle(f"fastppo's speed-up over each peer, median time per call ({document['device']}"
                 + (f", {mode} run: not a measurement" if mode in ("quick", "tiny") else "") + ")")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)


def zoo_schedules(params: dict) -> dict:
    """``params`` with rl-baselines3-zoo's ``"lin_<x>"`` learning rate and clip range (a linear
    schedule from x to 0) as SB3's callables of the remaining progress."""
    params = dict(params)
    for key in ("learning_rate", "clip_range"):
        if isinstance(params.get(key), str) and params[key].startswith("lin_"):
            initial = float(params[key][4:])
            params[key] = lambda progress, initial=initial: progress * initial
    return params


def sb3_return_curve():
    """``(callback, curve)``: an SB3 callback that appends ``(steps, seconds, mean return)`` to
    ``curve`` at the end of each rollout, the mean over SB3's last 100 episodes (its Monitor's raw
    returns); None before the first episode ends."""
    from stable_baselines3.common.callbacks import BaseCallback

    curve = []

    class Curve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.start = time.perf_counter()

        def _on_rollout_end(self):
            infos = self.model.ep_info_buffer
            curve.append((self.num_timesteps, time.perf_counter() - self.start,
                          float(sum(i["r"] for i in infos) / len(infos)) if infos else None))

        def _on_step(self):
            return True

    return Curve(), curve


def plot_return_curves(ax_steps, ax_seconds, runs, colors, labels, **style):
    """Draws each run's learning curve (``run["curve"]``: ``(steps, seconds, mean return or None)``
    points, as :func:`sb3_return_curve` and fastppo's metrics give them) against environment steps
    on ``ax_steps`` and wall time on ``ax_seconds``, coloured by ``run["contender"]``; seed 1's curve
    carries the contender's label (``labels``). Runs without a curve or a point are skipped."""
    for r in runs:
        points = [(s, t, v) for s, t, v in r.get("curve", ()) if v is not None]
        if not points:
            continue
        steps, seconds, values = zip(*points)
        label = labels[r["contender"]] if r["seed"] == 1 else None
        for ax, xs in ((ax_steps, steps), (ax_seconds, seconds)):
            ax.plot(xs, values, color=colors[r["contender"]], alpha=0.8, label=label, **style)
