"""Benchmark fastppo.linear_logprob_entropy and fastppo.linear_ppo_loss against the logits path.

Run from the repository root: ``python -m benchmarks.bench_linear`` writes benchmarks/results/linear_cpu.md,
linear_cpu.json and linear_cpu.png; ``--quick`` and ``--tiny`` (a test of this script, seconds) print and
write only with ``--out`` / ``--json`` (the plot goes next to ``--out``); ``--threads``, ``--device cuda``
as every bench script takes them (see benchmarks/_common.py).

Each case is one forward and backward from an LM's last hidden states ``hidden [tokens, H]`` and head
``weight [V, H]`` (both leaves that require grad) to the gradients of both:

- ``linear_logprob_entropy``: a fixed random weighting of the per-token log-prob and entropy, summed,
  then ``.backward()``. Contenders: fastppo.linear_logprob_entropy (chunked, never the whole logits);
  the logits path (``hidden @ weight.T``, then fastppo.categorical_logprob_entropy); eager torch
  (``log_softmax`` of the logits, ``gather``, ``-(p * logp).sum(-1)``).
- ``linear_ppo_loss``: ppo_loss's default policy loss with ``ent_coef=0.01`` over B sequences of
  tokens / B, then ``out.loss.backward()``. Contenders: fastppo.linear_ppo_loss; the logits path with
  fastppo's head and fastppo.ppo_loss.

In bfloat16 the GEMMs run in bf16 and every path upcasts the logits to float32 before the head or
log_softmax. Each contender runs in a fresh process (``python -m benchmarks.bench_linear --worker``):
its peak memory beyond the inputs and their ``.grad`` is the process's peak resident set during one
call (VmHWM, reset through /proc/self/clear_refs after a warm-up call) minus its resident set before
the call, minus the bytes of the ``.grad`` tensors the call makes; the worker runs with glibc's mmap
threshold fixed at 128 KiB, so freed buffers leave the resident set at once. Then the median time of
the calls that fit the mode's budget. A sweep over V plots memory and time against V.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_linear
except ImportError:
    import _common as common  # python benchmarks/bench_linear.py

SIZES = {  # tokens, H, V of the main cases; B sequences for the loss; the V sweep (linear_logprob_entropy, fp32)
    "full": dict(tokens=4096, H=256, V=128256, B=8, sweep=[8192, 32768, 128256]),
    "quick": dict(tokens=1024, H=128, V=32768, B=4, sweep=[4096, 32768]),
    "tiny": dict(tokens=64, H=16, V=1031, B=2, sweep=[257, 1031]),
}
ENT_COEF = 0.01
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # relative difference to the logits path's loss and gradient norms

LLE, LOSS = "linear_logprob_entropy", "linear_ppo_loss"
FASTPPO_LLE = "fastppo.linear_logprob_entropy"
FASTPPO_LOSS = "fastppo.linear_ppo_loss"
LOGITS = "logits + fastppo head"
LOGITS_LOSS = "logits + fastppo head + ppo_loss"
EAGER = "eager log_softmax"
PATHS = {LLE: [FASTPPO_LLE, LOGITS, EAGER], LOSS: [FASTPPO_LOSS, LOGITS_LOSS]}
BASELINE = {LLE: LOGITS, LOSS: LOGITS_LOSS}  # the column the ratios divide by
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}  # large buffers are mmapped and unmapped at free


# --- The worker: one contender in its own process --------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_inputs(torch, kernel, dtype, tokens, H, V, B, seed=0):
    """hidden [tokens, H] (or [B, tokens / B, H] for the loss) and weight [V, H], leaves made in their
    dtype directly (no larger temporary); targets; the loss's old log-probs and advantages, or the
    log-prob / entropy weights. Logits come out small (a freshly initialized head), so log-probs sit
    near -log V and the old ones are a little off them."""
    g = torch.Generator().manual_seed(seed)
    shape = (tokens,) if kernel == LLE else (B, tokens // B)
    hidden = torch.randn(*shape, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * (0.02 / (H / 256) ** 0.5)).requires_grad_()
    targets = torch.randint(0, V, shape, generator=g)
    a = torch.randn(shape, generator=g, dtype=torch.float32)
    b = torch.randn(shape, generator=g, dtype=torch.float32)
    if kernel == LOSS:
        a = a * 0.1 - float(torch.log(torch.tensor(float(V))))
    return hidden, weight, targets, a, b


def make_step(torch, fastppo, kernel, path, hidden, weight, targets, a, b):
    """One forward and backward of ``path``; returns the loss (a detached scalar)."""
    def logits_of():
        logits = hidden @ weight.t()
        return logits.float() if logits.dtype != torch.float64 else logits

    def logprob_entropy():
        if path == FASTPPO_LLE:
            return fastppo.linear_logprob_entropy(hidden, weight, targets)
        if path in (LOGITS, LOGITS_LOSS):
            return fastppo.categorical_logprob_entropy(logits_of(), targets)
        logp = torch.log_softmax(logits_of(), dim=-1)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def step():
        if path == FASTPPO_LOSS:
            loss = fastppo.linear_ppo_loss(hidden, weight, targets, a, b, ent_coef=ENT_COEF).loss
        elif path == LOGITS_LOSS:
            lp, ent = logprob_entropy()
            loss = fastppo.ppo_loss(lp, a, b, entropy=ent, ent_coef=ENT_COEF).loss
        else:
            lp, ent = logprob_entropy()
            loss = (lp * a).sum() + (ent * b).sum()
        loss.backward()
        return loss.detach()

    return step


def worker(spec):
    """Measures one contender in this (fresh) process; prints one JSON line."""
    import torch
    import fastppo

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    hidden, weight, targets, a, b = make_inputs(torch, spec["kernel"], dtype, spec["tokens"], spec["H"], spec["V"],
                                                spec["B"])
    step = make_step(torch, fastppo, spec["kernel"], spec["path"], hidden, weight, targets, a, b)

    def call():
        hidden.grad = weight.grad = None  # each call makes .grad afresh (no accumulation into an old one)
        return step()

    loss = call()  # the warm-up, and the check's figures
    check = dict(loss=float(loss), hidden_grad_norm=float(hidden.grad.double().norm()),
                 weight_grad_norm=float(weight.grad.double().norm()))
    hidden.grad = weight.grad = None
    gc.collect()
    memory = "n/a (/proc/self/clear_refs not writable)"
    if common.reset_peak_rss():
        before = _status_kib("VmRSS")
        call()
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
        memory = (_status_kib("VmHWM") - before) * 1024 - grad_bytes
    ms = common.median_ms(call, warmup=0, **{k: v for k, v in spec["timing"].items() if k != "warmup"})
    print(json.dumps(dict(check=check, memory=memory, ms=ms)))


def run_worker(spec):
    """Runs one contender in a fresh process and returns its JSON figures (or why it failed)."""
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_linear", "--worker", json.dumps(spec)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"worker failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- The cases ------------------------------------------------------------------------------------


def cases(mode):
    """(kernel, dtype, V) of every case: the targets' rows (fp32 and bf16, both kernels) and the V sweep."""
    size = SIZES[mode]
    main = [(kernel, dtype, size["V"]) for dtype in ("float32", "bfloat16") for kernel in (LLE, LOSS)]
    sweep = [(LLE, "float32", V) for V in size["sweep"] if V != size["V"]]
    return main + sweep


def collect(args):
    common.threads_env(args)
    device, mode, _ = common.setup_device(args)
    if device != "cpu":
        sys.exit("error: bench_linear measures the CPU (peak RSS per process); --device cuda is not supported")
    size = SIZES[mode]
    rows, warnings = [], []
    for kernel, dtype, V in cases(mode):
        row = dict(kernel=kernel, dtype=dtype, V=V, tokens=size["tokens"], H=size["H"], B=size["B"], paths={})
        for path in PATHS[kernel]:
            spec = dict(kernel=kernel, dtype=dtype, path=path, V=V, tokens=size["tokens"], H=size["H"], B=size["B"],
                        threads=args.threads, timing=common.TIMING[mode])
            row["paths"][path] = figures = run_worker(spec)
            print(f"{kernel:24s} {dtype:9s} V={V:<7d} {path:34s} "
                  + (figures["error"] if "error" in figures else
                     f"{common.fmt(figures['ms']):>8s} ms  peak {common.fmt_bytes(figures['memory'])}"),
                  file=sys.stderr)
        warnings += check_row(row)
        rows.append(row)
    return dict(device=device, mode=mode, machine=common.machine_info(device), size=size, rows=rows, warnings=warnings)


def check_row(row):
    """Warnings where a contender's loss or gradient norms differ from the logits path's."""
    base = row["paths"][BASELINE[row["kernel"]]]
    out = []
    for path, figures in row["paths"].items():
        if "error" in figures:
            out.append(f"WARNING {row['kernel']} {row['dtype']} V={row['V']}: {path}: {figures['error']}")
            continue
        if "error" in base or path == BASELINE[row["kernel"]]:
            continue
        for name, value in figures["check"].items():
            want = base["check"][name]
            diff = abs(value - want) / max(abs(want), 1e-30)
            figures.setdefault("rel_diff", {})[name] = diff
            tolerance = TOLERANCE[row["dtype"]]
            if not diff <= tolerance:
                out.append(f"WARNING {row['kernel']} {row['dtype']} V={row['V']}: {path} {name} differs from "
                           f"{BASELINE[row['kernel']]}'s by {diff:.3g} relative (tolerance {tolerance:g})")
    return out


# --- Report ---------------------------------------------------------------------------------------


def _ms(figures):
    return figures.get("ms") if "error" not in figures else figures["error"]


def _ratio(a, b):
    return common.fmt(a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else "-"


def report(result):
    size, mode = result["size"], result["mode"]
    lines = ["# fastppo.linear_logprob_entropy and fastppo.linear_ppo_loss against the logits path (CPU)", ""]
    lines += common.mode_banner(mode, f"tokens {size['tokens']}, H {size['H']}, V {size['V']}")
    lines += ["## Machine", ""] + common.machine_head(result["machine"]) + [""]
    lines += ["## Forward and backward, peak memory beyond the inputs and their .grad", "",
              "Each contender in a fresh process. Ratios divide by the logits path of the same kernel and dtype.", ""]
    cells = []
    for row in result["rows"]:
        if row["V"] != size["V"]:
            continue
        base = row["paths"][BASELINE[row["kernel"]]]
        for path, figures in row["paths"].items():
            cells.append([row["kernel"], row["dtype"], f"{row['tokens']} x {row['H']} x {row['V']}", path,
                          common.fmt(_ms(figures)) if _ms(figures) is not None else "-",
                          _ratio(figures.get("ms"), base.get("ms")),
                          common.fmt_bytes(figures.get("memory", "-")),
                          _ratio(figures.get("memory"), base.get("memory")),
                          ", ".join(f"{k} {v:.1e}" for k, v in figures.get("rel_diff", {}).items()) or "-"])
    lines += common.table(["kernel", "dtype", "tokens x H x V", "contender", "median ms", "time / logits path",
                           "peak extra memory", "memory / logits path", "relative difference to the logits path"],
                          "|---|---|---|---|---:|---:|---:|---:|---|", cells)
    lines += ["", f"## Against V (linear_logprob_entropy, float32, tokens {size['tokens']}, H {size['H']})", ""]
    sweep = sorted((row for row in result["rows"] if row["kernel"] == LLE and row["dtype"] == "float32"),
                   key=lambda row: row["V"])
    lines += common.table(["V"] + [f"{p} ms" for p in PATHS[LLE]] + [f"{p} memory" for p in PATHS[LLE]],
                          "|---:|" + "---:|" * (2 * len(PATHS[LLE])),
                          [[str(row["V"])] + [common.fmt(_ms(row["paths"][p])) for p in PATHS[LLE]]
                           + [common.fmt_bytes(row["paths"][p].get("memory", "-")) for p in PATHS[LLE]]
                           for row in sweep])
    lines += ["", "## Checks", ""]
    lines += [f"- {w}" for w in result["warnings"]] or [
        "- Every contender's loss and gradient norms (hidden, weight) agree with the logits path's within "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + " relative."]
    lines += ["", "## Notes", "",
              f"- Each case is the median of {common.TIMING_NOTES[mode]}",
              "- Memory: the peak resident set of the contender's own process during one call (VmHWM after "
              "/proc/self/clear_refs, a warm-up call before), minus the resident set before it, minus the bytes "
              "of the .grad tensors it makes; glibc's mmap threshold is fixed at 128 KiB in the workers, so a "
              "freed buffer leaves the resident set at once. It counts every allocation (torch's, the BLAS's, "
              "fastppo's).",
              "- fastppo.linear_logprob_entropy makes 4 GEMMs (the logits in forward, and in backward the logits "
              "again, d hidden and d weight); fastppo.linear_ppo_loss makes 3 (its gradients are made in forward); "
              "the logits paths make 3.",
              "- GEMMs: torch.matmul / addmm on the CPU (torch's BLAS); chunk rows: "
              "max(1, 2**27 // (4 V)) (about 128 MiB of float32 logits per chunk).",
              common.threads_note("cpu", "torch's GEMMs run on torch's threads")]
    return "\n".join(lines) + "\n"


def to_json(result):
    rows = []
    for row in result["rows"]:
        base = BASELINE[row["kernel"]]
        ms = {p: f["ms"] if "error" not in f else f["error"] for p, f in row["paths"].items()}
        fastppo_column = PATHS[row["kernel"]][0]
        rows.append(common.json_row(
            row["kernel"], f"{row['dtype']} V={row['V']}", dict(tokens=row["tokens"], H=row["H"], V=row["V"],
                                                                 B=row["B"], dtype=row["dtype"]),
            ms, [fastppo_column], {p: fastppo_column for p in PATHS[row["kernel"]][1:]},
            peak_extra_bytes={p: f.get("memory") for p, f in row["paths"].items()},
            rel_diff_to_logits_path={p: f.get("rel_diff") for p, f in row["paths"].items() if p != base}))
    return dict(name="linear", title=__doc__.splitlines()[0], script="benchmarks/bench_linear.py",
                warnings=result["warnings"], rows=rows)


def plot(result, path):
    """Peak extra memory and median time against V, one line per contender (linear_logprob_entropy, fp32)."""
    plt = common.pyplot()
    sweep = sorted((row for row in result["rows"] if row["kernel"] == LLE and row["dtype"] == "float32"),
                   key=lambda row: row["V"])
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for p in PATHS[LLE]:
        measured = [row for row in sweep if isinstance(row["paths"][p].get("memory"), int)
                    and row["paths"][p]["memory"] > 0]  # a log axis; a tiny run's figures can be noise below 0
        mem_ax.plot([row["V"] for row in measured], [row["paths"][p]["memory"] / 2 ** 20 for row in measured],
                    marker="o", label=p)
        vs = [row["V"] for row in sweep if "ms" in row["paths"][p]]
        time_ax.plot(vs, [row["paths"][p]["ms"] for row in sweep if "ms" in row["paths"][p]], marker="o", label=p)
    size = result["size"]
    for ax, label in ((mem_ax, "peak memory beyond inputs and .grad (MiB)"), (time_ax, "median fwd+bwd time (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("V")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"linear_logprob_entropy, float32 CPU, tokens {size['tokens']}, H {size['H']}"
                 + (f" ({result['mode']} run: not a measurement)" if result["mode"] != "full" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    args = common.bench_parser(__doc__.splitlines()[0], "linear").parse_args(argv)
    result = collect(args)
    document = to_json(result)
    full = result["mode"] == "full"
    if args.json is None and full:
        args.json = common.RESULTS / f"linear_{args.device}.json"
    status = common.write_reports(args, result, "linear", report(result), document)
    out = args.out if args.out is not None else (common.RESULTS / f"linear_{args.device}.md" if full else None)
    if out is not None:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
