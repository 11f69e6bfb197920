"""Run fastppo's three micro-benchmarks as one suite and gather their results in one place.

Run from the repository root:

    python -m benchmarks                          # full CPU run, writes to benchmarks/results/
    python -m benchmarks --quick                  # the scripts' quick smoke runs; prints, writes only with --out-dir
    python -m benchmarks --tiny --out-dir DIR     # seconds-long: smallest size of each kernel, 3 timed calls,
                                                  # no torch.compile (a test of the suite, not a measurement)
    python -m benchmarks --device cuda            # CUDA tensors; the file names end in _cuda
    python -m benchmarks --from-json PATH         # the tables and chart of a pytest-benchmark run (below)

Each benchmark script (bench_gae.py, bench_loss.py, bench_heads.py) runs in its own Python process,
exactly as it runs on its own: fastppo and that kernel's peers are measured on the same inputs in
the same process, and no benchmark's torch.compile caches, thread pools or allocations carry over
into the next. Each hands its rows back through its ``--json`` option. In the output folder the
suite writes:

- ``suite_<device>.json``: the machine (CPU model, cores, Python / numpy / torch / fastppo versions,
  ``fastppo.build_info()``, device, date) and every row: the kernel and case, fastppo's medians in
  ms, and for each peer its median and speed-up (peer time / fastppo time) or why it was skipped;
- ``suite_<device>.md``: a Markdown summary, one table of medians and speed-ups per kernel;
- ``speedups_<device>.png``: the speed-ups as bars, one panel per kernel;
- ``gae_<device>.md``, ``loss_<device>.md``, ``heads_<device>.md``: each script's own full report
  (notes, checks, compile times, memory tables).

The same cases (and bench_rlhf.py's) also run under pytest-benchmark, one test per (kernel, size,
contender): ``pytest benchmarks --benchmark-only --benchmark-json PATH``. ``--from-json PATH`` then
writes ``suite_<device>.json`` / ``.md`` / ``speedups_<device>.png`` from that file (each cell the
median of pytest-benchmark's rounds) instead of running the scripts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import (RESULTS, document_from_pytest, fmt, kernel_groups, machine_head, machine_info,
                                plot_speedups)

ROOT = Path(__file__).resolve().parent.parent

# (name used in the file names, module run with python -m)
BENCHMARKS = [
    ("gae", "benchmarks.bench_gae"),
    ("loss", "benchmarks.bench_loss"),
    ("heads", "benchmarks.bench_heads"),
]

MODE_BANNERS = {
    "quick": "**Quick smoke run (--quick): each script's quick mode, about 20 ms of timed calls per case; "
    "not a measurement.**",
    "tiny": "**Tiny run (--tiny): the smallest size of each kernel, 3 timed calls per case, no torch.compile; "
    "a test of the suite, not a measurement.**",
    "pytest-benchmark": "**Timed by pytest-benchmark (`pytest benchmarks --benchmark-only`): each cell is the median "
    "of its rounds; a contender whose test was skipped names the reason.**",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Run fastppo's micro-benchmarks as one suite.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="each script's quick smoke run (fewer sizes, tiny repeat counts)")
    size.add_argument("--tiny", action="store_true",
                      help="smallest size of each kernel, 3 timed calls, no torch.compile (for tests; needs "
                      "--out-dir to write)")
    size.add_argument("--from-json", type=Path, metavar="PATH",
                      help="build the tables and chart from pytest-benchmark's --benchmark-json file instead of "
                      "running the scripts (the device is the one that run used)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out-dir", type=Path, help="folder for the results (default benchmarks/results/; "
                        "--quick and --tiny write only with --out-dir)")
    return parser.parse_args(argv)


def run_benchmark(module, flags, json_path, report_path):
    """Runs one benchmark script in its own process; returns its exit status."""
    command = [sys.executable, "-m", module, *flags, "--json", str(json_path)]
    if report_path is not None:
        command += ["--out", str(report_path)]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    # The script prints its Markdown report on stdout (written to report_path when there is one);
    # its progress lines on stderr are passed through.
    return subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL).returncode


# --- Markdown ------------------------------------------------------------------------------------


def kernel_table(rows):
    """Markdown lines for one kernel: a row per case, a column per fastppo variant and per peer."""
    # Columns in the order they first appear (a dict keeps insertion order).
    fastppo_columns = list(dict.fromkeys(c for r in rows for c in [*r["fastppo_ms"], *r["fastppo_skipped"]]))
    peers = list(dict.fromkeys((p["name"], p["vs"]) for r in rows for p in r["peers"]))
    several = len(fastppo_columns) > 1  # then say which fastppo column each speed-up is taken against
    header = ["case"] + [f"{c} (ms)" for c in fastppo_columns]
    header += [f"{name} (ms, speed-up vs {vs})" if several else f"{name} (ms, speed-up)" for name, vs in peers]
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["case"]]
        for column in fastppo_columns:
            if column in row["fastppo_ms"]:
                cells.append(fmt(row["fastppo_ms"][column]))
            else:
                cells.append(row["fastppo_skipped"][column])
        entries = {(p["name"], p["vs"]): p for p in row["peers"]}
        for peer in peers:
            entry = entries.get(peer)
            if entry is None:
                cells.append("-")
            elif "skipped" in entry:
                cells.append(entry["skipped"])
            elif "speedup" in entry:
                cells.append(f"{fmt(entry['median_ms'])} ({fmt(entry['speedup'])}x)")
            else:
                cells.append(fmt(entry["median_ms"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(document, plot_name):
    machine, device, mode = document["machine"], document["device"], document["mode"]
    lines = [f"# fastppo benchmark suite ({device})", ""]
    if mode in MODE_BANNERS:
        lines += [MODE_BANNERS[mode], ""]
    lines += [
        "## Machine",
        "",
        *machine_head(machine),
        "",
        "## Median time per call and speed-ups",
        "",
        "Each peer cell holds the peer's median time per call in ms and, in brackets, fastppo's speed-up over "
        "it: peer time / fastppo time (above 1: fastppo is faster). A peer that could not run here names the "
        "reason instead. Each benchmark measures fastppo and its peers on the same inputs in one process; "
        "each script's own report says exactly what each call does.",
    ]
    for title, rows in kernel_groups(document["rows"]):
        lines += ["", f"### {title}", ""] + kernel_table(rows)
    lines += ["", "## Benchmarks", ""]
    for bench in document["benchmarks"]:
        if "failed" in bench:
            lines.append(f"- **{bench['name']} ({bench['script']}): failed, {bench['failed']}**")
            continue
        report = bench["report"]
        text = f"- {bench['title']}: `{bench['script']}`" + (f", full report [{report}]({report})" if report else "")
        lines.append(text + ".")
        lines += [f"  - **{w}**" for w in bench["warnings"]] or [
            "  - Checks: every measured peer's outputs matched fastppo's (see the script's report for tolerances)."
        ]
    if plot_name is not None:
        lines += ["", f"![fastppo speed-up over each peer]({plot_name})"]
    return "\n".join(lines) + "\n"


# --- Main ----------------------------------------------------------------------------------------


def run_scripts(device, mode, out_dir):
    """Runs each benchmark script; returns the suite's document and the names of those that failed."""
    flags = ["--device", device] + ({"full": [], "quick": ["--quick"], "tiny": ["--tiny"]}[mode])
    if device == "cuda":
        import torch
        import fastppo

        if not (torch.cuda.is_available() and fastppo.cuda_available()):
            sys.exit("error: --device cuda, but torch sees no CUDA device or this fastppo build cannot use one: "
                     f"torch.cuda.is_available() is {torch.cuda.is_available()}; {fastppo.build_info()}")
    document = {"machine": machine_info(device), "device": device, "mode": mode, "benchmarks": [], "rows": []}
    failed = []
    with tempfile.TemporaryDirectory(prefix="fastppo_suite_") as tmp:
        for name, module in BENCHMARKS:
            json_path = Path(tmp) / f"{name}.json"
            report_path = None if out_dir is None else out_dir / f"{name}_{device}.md"
            status = run_benchmark(module, flags, json_path, report_path)
            if status != 0 or not json_path.exists():
                failed.append(name)
                script = "benchmarks/" + module.split(".")[-1] + ".py"
                document["benchmarks"].append({"name": name, "script": script, "failed": f"exit status {status}"})
                continue
            part = json.loads(json_path.read_text())
            for bench in part["benchmarks"]:
                bench["report"] = None if report_path is None else report_path.name
            document["benchmarks"] += part["benchmarks"]
            document["rows"] += part["rows"]
    return document, failed


def main(argv=None):
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    out_dir = args.out_dir if args.out_dir is not None or mode != "full" else RESULTS
    if args.from_json is not None:
        document, failed = document_from_pytest(json.loads(args.from_json.read_text())), []
    else:
        document, failed = run_scripts(args.device, mode, out_dir)
    device = document["device"]
    plot_name = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"suite_{device}.json").write_text(json.dumps(document, indent=1) + "\n")
        if document["rows"]:
            plot_name = f"speedups_{device}.png"
            plot_speedups(document, out_dir / plot_name)
    text = markdown(document, plot_name)
    print(text)
    if out_dir is not None:
        (out_dir / f"suite_{device}.md").write_text(text)
        written = [f"suite_{device}.json", f"suite_{device}.md"] + ([plot_name] if plot_name else [])
        print(f"wrote {', '.join(written)} in {out_dir}", file=sys.stderr)
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
