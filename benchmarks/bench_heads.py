"""Benchmark fastppo's fused policy heads against torch.distributions in eager and under torch.compile.

Run from the repository root: ``python -m benchmarks.bench_heads`` writes benchmarks/results/heads_cpu.md;
``--quick`` (3 small cases), ``--tiny`` (smallest size of each head, no torch.compile), ``--threads``,
``--device cuda``, ``--out`` and ``--json`` as every bench script takes them (see benchmarks/_common.py).

Five heads, each returning ``(logprob, entropy)`` per row:

- categorical: ``fastppo.categorical_logprob_entropy(logits, actions)`` with float32 logits
  ``[rows, A]`` and int64 actions ``[rows]``, against ``torch.distributions.Categorical(logits=logits)``
  with ``.log_prob(actions)`` and ``.entropy()``;
- masked categorical: the same with a bool mask of legal actions ``[rows, A]``
  (``categorical_logprob_entropy(logits, actions, mask=mask)``), against sb3-contrib's
  ``MaskableCategorical`` written out (a copy of the logits with -1e8 at illegal actions,
  ``Categorical`` over it, the entropy summed over legal actions);
- multi-discrete: ``fastppo.multi_categorical_logprob_entropy(logits, actions, nvec)`` with logits
  ``[rows, sum(nvec)]`` and actions ``[rows, len(nvec)]``, against SB3's
  ``MultiCategoricalDistribution`` (a ``Categorical`` per component, stacked and summed);
- Gaussian: ``fastppo.normal_logprob_entropy(mean, log_std, actions)`` with mean and actions
  ``[rows, D]`` and one log_std ``[D]`` shared by every row (CleanRL's continuous agent), against
  ``torch.distributions.Normal(mean, log_std.exp())`` with ``.log_prob(actions).sum(-1)`` and
  ``.entropy().sum(-1)``;
- tanh-squashed Gaussian: ``fastppo.tanh_normal_logprob_entropy(mean, log_std, actions)`` with
  actions in (-1, 1), against ``TransformedDistribution(Normal(mean, log_std.exp()),
  [TanhTransform()])``'s ``.log_prob(actions).sum(-1)`` and the base Normal's entropy.

For each size it times one forward + backward call: the head, then ``torch.autograd.grad`` of
``(logprob * w1 + entropy * w2).sum()`` with respect to the logits (or mean and log_std), with
fixed random weights w1, w2 of ``rows`` elements. Contenders: fastppo; the torch.distributions
function in eager; the same function under ``torch.compile`` (inductor, ``dynamic=False``,
compiled afresh for each size, its first call, the compile, reported in its own table). It also
reports each contender's peak extra memory during one call next to the size of the input
gradients, and checks once per size that fastppo's (and the compiled function's) outputs and
gradients match eager's.
"""

from __future__ import annotations

import sys

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_heads
except ImportError:
    import _common as common  # python benchmarks/bench_heads.py

# Imported by import_libraries(), after --threads has set OMP_NUM_THREADS and after
# TORCHINDUCTOR_CACHE_DIR is chosen.
torch = None
fastppo = None
peers = None

CATEGORICAL = "categorical"
MASKED = "masked categorical"
MULTI = "multi-discrete"
GAUSSIAN = "Gaussian"
TANH = "tanh Gaussian"
SIZES = {  # (rows, A) for the categorical heads, (rows, nvec) multi-discrete, (rows, D) the Gaussians
    CATEGORICAL: [(4096, 6), (4096, 18), (2048, 32000), (256, 131072)],
    MASKED: [(4096, 6), (4096, 18)],
    MULTI: [(4096, (3, 3, 3, 3)), (4096, (1, 5, 2))],
    GAUSSIAN: [(4096, 6), (4096, 17)],
    TANH: [(4096, 6), (4096, 17)],
}
N_NAMES = {CATEGORICAL: "A", MASKED: "A", MULTI: "nvec", GAUSSIAN: "D", TANH: "D"}  # what n of (rows, n) is


def width(n):
    """Columns per row: A, D or sum(nvec)."""
    return sum(n) if isinstance(n, tuple) else n


MODE_SIZES = {
    "full": SIZES,
    "quick": {CATEGORICAL: [(4096, 6), (64, 32000)], MASKED: [(4096, 18)], MULTI: [(4096, (3, 3, 3, 3))],
              GAUSSIAN: [(4096, 6)], TANH: [(4096, 6)]},
    "tiny": {head: [min(sizes, key=lambda size: size[0] * width(size[1]))] for head, sizes in SIZES.items()},
}
WARMUP_COMPILE_SIZES = {CATEGORICAL: (8, 4), MASKED: (8, 4), MULTI: (8, (2, 2)), GAUSSIAN: (8, 4), TANH: (8, 4)}
WARMUP_COMPILE_SIZE = (8, 4)  # compiled once per head first (multi-discrete: nvec (2, 2)), untimed in the tables
TOLERANCE = 1e-4  # relative difference allowed between fastppo's outputs / gradients and eager's

FASTPPO = "fastppo"
EAGER = "torch.distributions eager"
COMPILED = "torch.distributions torch.compile"
CONTENDERS = [FASTPPO, EAGER, COMPILED]
PEER_BASELINES = {EAGER: FASTPPO, COMPILED: FASTPPO}  # each peer and the column its speed-up is taken against
KERNELS = {CATEGORICAL: "categorical_logprob_entropy", MASKED: "categorical_logprob_entropy",  # fastppo's names
           MULTI: "multi_categorical_logprob_entropy", GAUSSIAN: "normal_logprob_entropy",
           TANH: "tanh_normal_logprob_entropy"}
GRADS = "gradient size"  # bytes of the returned gradients: rows*A*4 (A = sum(nvec)), or rows*D*4 + D*4
LEGAL = 0.75  # share of legal actions in the masked head's masks

# Measured before this benchmark existed (the numbers, this machine, an earlier run): ms.
REFERENCE_MS = {
    (CATEGORICAL, 4096, 6): (0.91, 0.33),
    (CATEGORICAL, 4096, 18): (1.27, 0.70),
    (CATEGORICAL, 2048, 32000): (1579, 254),
    (CATEGORICAL, 256, 131072): (731, 155),
    (GAUSSIAN, 4096, 6): (0.67, None),
    (GAUSSIAN, 4096, 17): (0.94, None),
}


# --- The peers (tests/peers.py) and fastppo ------------------------------------------------------
#
# validate_args=False is explicit: torch.compile's first call turns torch.distributions' argument
# validation off for the whole process (dynamo's TorchPatcher), so the eager peer would otherwise
# validate or not depending on whether anything was compiled before it; this way eager and
# compiled run the same code.


def torch_categorical(logits, actions):
    return peers.torch_categorical(logits, actions, validate_args=False)


def torch_normal(mean, log_std, actions):
    return peers.torch_normal(mean, log_std, actions, validate_args=False)


def maskable_categorical(logits, actions, mask):
    return peers.maskable_categorical(logits, actions, mask, validate_args=False)


def torch_multi_categorical(logits, actions, nvec):
    return peers.torch_multi_categorical(logits, actions, nvec, validate_args=False)


def torch_tanh_normal(mean, log_std, actions):
    return peers.torch_tanh_normal(mean, log_std, actions, validate_args=False)


def fastppo_categorical(logits, actions):
    return fastppo.categorical_logprob_entropy(logits, actions)


def fastppo_masked(logits, actions, mask):
    return fastppo.categorical_logprob_entropy(logits, actions, mask=mask)


def fastppo_multi(logits, actions, nvec):
    return fastppo.multi_categorical_logprob_entropy(logits, actions, nvec)


def fastppo_normal(mean, log_std, actions):
    return fastppo.normal_logprob_entropy(mean, log_std, actions)


def fastppo_tanh_normal(mean, log_std, actions):
    return fastppo.tanh_normal_logprob_entropy(mean, log_std, actions)


PEERS = {CATEGORICAL: torch_categorical, MASKED: maskable_categorical, MULTI: torch_multi_categorical,
         GAUSSIAN: torch_normal, TANH: torch_tanh_normal}
FASTPPO_FNS = {CATEGORICAL: fastppo_categorical, MASKED: fastppo_masked, MULTI: fastppo_multi,
               GAUSSIAN: fastppo_normal, TANH: fastppo_tanh_normal}
LOGIT_HEADS = (CATEGORICAL, MASKED, MULTI)
GRAD_NAMES = {head: ["grad logits"] if head in LOGIT_HEADS else ["grad mean", "grad log_std"] for head in PEERS}


# --- Inputs and contenders -----------------------------------------------------------------------


def make_inputs(head, rows, n, device, seed):
    """``(args, params, w1, w2)``: the head's arguments, its differentiable leaves, the weights.

    Categorical: logits = 2 N(0, 1) (float32 [rows, A]), actions uniform in [0, A) (int64).
    Masked categorical: the same logits, a bool mask with each action legal with probability
    LEGAL (and one forced legal per row), actions uniform among the legal ones. Multi-discrete:
    logits = 2 N(0, 1) [rows, sum(nvec)], each component's action uniform in [0, nvec[k]).
    Gaussian: mean ~ N(0, 1) [rows, D], log_std = -0.5 + 0.2 N(0, 1) [D], actions sampled from the
    policy (mean + exp(log_std) N(0, 1)); tanh Gaussian: the same, squashed by tanh.
    w1, w2 ~ N(0, 1) [rows].
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    if head in LOGIT_HEADS:
        logits = (2 * randn(rows, width(n))).to(device).requires_grad_(True)
        if head == CATEGORICAL:
            extra = (torch.randint(0, n, (rows,), generator=g, dtype=torch.int64).to(device),)
        elif head == MASKED:
            mask = torch.rand(rows, n, generator=g) < LEGAL
            mask[torch.arange(rows), torch.randint(0, n, (rows,), generator=g)] = True
            actions = torch.where(mask, torch.rand(rows, n, generator=g), -1.0).argmax(-1)
            extra = (actions.to(device), mask.to(device))
        else:
            actions = torch.stack([torch.randint(0, k, (rows,), generator=g) for k in n], -1)
            extra = (actions.to(device), n)
        args, params = (logits, *extra), [logits]
    else:
        mean = randn(rows, n)
        log_std = -0.5 + 0.2 * randn(n)
        actions = mean + log_std.exp() * randn(rows, n)
        actions = (torch.tanh(actions) if head == TANH else actions).to(device)
        mean = mean.to(device).requires_grad_(True)
        log_std = log_std.to(device).requires_grad_(True)
        args, params = (mean, log_std, actions), [mean, log_std]
    w1, w2 = randn(rows).to(device), randn(rows).to(device)
    return args, params, w1, w2


def step_call(head, head_fn, inputs):
    """The timed call: the head, then the gradients of the weighted sum w.r.t. its leaves."""
    args, params, w1, w2 = inputs

    def call():
        logprob, entropy = head_fn(*args)
        grads = torch.autograd.grad((logprob * w1 + entropy * w2).sum(), params)
        return {"logprob": logprob.detach(), "entropy": entropy.detach(), **dict(zip(GRAD_NAMES[head], grads))}

    return call


def case_contenders(head, rows, n, device, compiling):
    """The case's contenders, and the bytes of the gradients they return."""
    inputs = make_inputs(head, rows, n, device, seed=rows * 1_000_003 + width(n))
    calls = {FASTPPO: step_call(head, FASTPPO_FNS[head], inputs), EAGER: step_call(head, PEERS[head], inputs),
             COMPILED: step_call(head, common.compile_fresh(PEERS[head]), inputs) if compiling else common.NOT_COMPILED}
    return common.Contenders(calls, EAGER, TOLERANCE), sum(p.numel() * p.element_size() for p in inputs[1])


# --- Report --------------------------------------------------------------------------------------


def n_text(n):
    return "[" + ", ".join(map(str, n)) + "]" if isinstance(n, tuple) else str(n)


def key_cells(key):
    head, n_rows, n = key
    return [head, str(n_rows), n_text(n)]


def reference_line(head, rows, n):
    eager, compiled = REFERENCE_MS[(head, rows, n)]
    text = f"{head} ({rows}, {n}): eager {common.fmt(eager)} ms"
    return text + (f", torch.compile {common.fmt(compiled)} ms" if compiled is not None else "")


def report(result):
    rows, device, mode, sizes = result["rows"], result["device"], result["mode"], result["sizes"]
    key_header, key_rule = ["head", "rows", "A, nvec or D"], "|:---|---:|---:|"
    ratio_columns = [(f"{EAGER} / {FASTPPO}", EAGER, FASTPPO), (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO)]
    mem_ratio_columns = [(f"{FASTPPO} / {GRADS}", FASTPPO, GRADS)] + ratio_columns
    shown = "; ".join(f"{head} (rows, {N_NAMES[head]}) in {s}" for head, s in sizes.items())
    lines = [f"# fastppo policy heads benchmark ({device})", ""] + common.mode_banner(mode, shown, compiles=True)
    lines += ["## Machine", ""] + common.machine_head(result["machine"])
    lines += [f"- torch.compile: {result['compile_info']}", ""]
    lines += ["## Median time per forward + backward call (ms, lower is better)", ""] + common.table(
        key_header + CONTENDERS + [name for name, _, _ in ratio_columns],
        key_rule + "---:|" * (len(CONTENDERS) + len(ratio_columns)),
        [key_cells(key) + [common.fmt(row[c]) for c in CONTENDERS]
         + [common.ratio(row, num, den) for _, num, den in ratio_columns] for key, row in rows.items()])
    lines += [""] + ([f"**{w}**" for w in result["warnings"]] or [
        "Checks: at every size, fastppo's " + ("" if mode == "tiny" else "and the compiled function's ")
        + f"log-prob, entropy and gradients matched {EAGER}'s to {TOLERANCE:g} relative (max |difference| / "
        "max |eager|)."])
    lines += ["", f"## {COMPILED}: compile time (first call at each size, not in the table above)", ""]
    lines += common.compile_table(rows, key_cells, key_header, key_rule, EAGER, COMPILED)
    memory = {key: dict(row["memory"], **{GRADS: row["grad_bytes"]}) for key, row in rows.items()}
    lines += ["", "## Peak extra memory during one forward + backward call (lower is better)", ""] + common.table(
        key_header + CONTENDERS + [GRADS] + [name for name, _, _ in mem_ratio_columns],
        key_rule + "---:|" * (len(CONTENDERS) + 1 + len(mem_ratio_columns)),
        [key_cells(key) + [common.fmt_bytes(mem[c]) for c in CONTENDERS + [GRADS]]
         + [common.ratio(mem, num, den) for _, num, den in mem_ratio_columns] for key, mem in memory.items()])
    lines += [
        "",
        "## Notes",
        "",
        "- Reference, measured before fastppo's heads existed (earlier measurements on this machine, not this run): "
        + "; ".join(reference_line(*key) for key in REFERENCE_MS)
        + ".",
        "- Inputs: categorical: float32 logits = 2 N(0,1) of [rows, A], int64 actions uniform in [0, A); masked "
        f"categorical: the same logits, a bool mask with each action legal with probability {LEGAL} (one forced legal "
        "per row), actions uniform among the legal ones; multi-discrete: float32 logits = 2 N(0,1) of "
        "[rows, sum(nvec)], int64 actions [rows, len(nvec)] uniform in each component's range; Gaussian: "
        "float32 mean ~ N(0,1) of [rows, D], one log_std = -0.5 + 0.2 N(0,1) of [D] shared by every row (as CleanRL's "
        "continuous agent learns it), actions sampled from that policy; tanh Gaussian: the same, the actions squashed "
        "by tanh. The logits (or mean and log_std) are leaves "
        "with requires_grad; w1, w2 ~ N(0,1) of [rows] are made once per size, before timing.",
        "- Timed call: the head's forward (log-prob and entropy per row; the Gaussian's summed over D), then "
        "`torch.autograd.grad((logprob * w1 + entropy * w2).sum(), [logits])` (or `[mean, log_std]`); the weighted "
        "sum runs in eager for every contender. Each contender is timed in its own block of consecutive calls; each "
        "case is the median of " + common.TIMING_NOTES[mode],
        f"- `{FASTPPO}`: `fastppo.categorical_logprob_entropy(logits, actions)` (temperature 1; masked: `mask=mask`), "
        "`fastppo.multi_categorical_logprob_entropy(logits, actions, nvec)`, "
        "`fastppo.normal_logprob_entropy(mean, log_std, actions)` and "
        "`fastppo.tanh_normal_logprob_entropy(mean, log_std, actions)`.",
        f"- `{EAGER}`: `Categorical(logits=logits)` with `.log_prob(actions)`, `.entropy()`; masked: sb3-contrib's "
        "`MaskableCategorical` written out (`torch.where(mask, logits, -1e8)`, `Categorical` over it, the entropy "
        "`-where(mask, logits * probs, 0).sum(-1)`); multi-discrete: SB3's `MultiCategoricalDistribution` (a "
        "`Categorical` per `torch.split` of the logits, log-probs and entropies stacked and summed); "
        "`Normal(mean, log_std.exp())` with `.log_prob(actions).sum(-1)`, `.entropy().sum(-1)`; tanh Gaussian: "
        "`TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])` with `.log_prob(actions).sum(-1)` "
        "and the base Normal's `.entropy().sum(-1)`; all with "
        "`validate_args=False`, explicitly: torch.compile's first call turns validation off for the whole process "
        "anyway, and this keeps eager and compiled running the same code (a script that never compiles validates "
        "by default, which adds a pass over the inputs).",
        f"- `{COMPILED}`: the same function under `torch.compile(..., dynamic=False)` (inductor). Dynamo's caches "
        "are reset before each size, so each size compiles once, forward and backward graphs, with one cache entry "
        "in use while it is timed. Its first call at each size (the compile, measured with time.perf_counter) is "
        "the compile table's column; a one-time warm-up compile of each head at (rows, A or D) = "
        f"{WARMUP_COMPILE_SIZE} (multi-discrete: nvec [2, 2]) first absorbs process-wide setup (imports, compile "
        "workers).",
        common.threads_note(device, "eager torch ops and inductor's C++ kernels use torch's threads"),
        common.memory_note(device),
        f"- `{GRADS}`: the bytes of the returned gradients, rows * A * 4 for the logits' gradient (A = sum(nvec) for "
        "multi-discrete; rows * D * 4 + "
        "D * 4 for mean's and log_std's); they are part of every contender's figure. fastppo's target is no more "
        f"than this plus O(rows) (its two outputs and the weighted sum's arrays of rows elements): "
        f"`{FASTPPO} / {GRADS}` near 1 at large A.",
    ]
    return "\n".join(lines) + "\n"


def size_of(head, n_rows, n):
    """``(case, size)`` as the JSON rows name them (the masked head's case says so: it shares its
    kernel's table with the unmasked one)."""
    n_name = N_NAMES[head]
    size = {"rows": n_rows, n_name: list(n) if isinstance(n, tuple) else n}
    case = f"rows={n_rows}, {n_name}={n_text(n)}"
    if head == MASKED:
        return case + ", masked", dict(size, masked=LEGAL)
    return case, size


def to_json(result):
    """This benchmark's summary and rows (one kernel per head), for the --json file (``common.write_reports``)."""
    rows = [common.json_row(KERNELS[key[0]], *size_of(*key), row, [FASTPPO], PEER_BASELINES,
                            compile_first_call_ms=row["compile"], peak_extra_bytes=row["memory"],
                            gradient_bytes=row["grad_bytes"])
            for key, row in result["rows"].items()]
    return {"name": "heads", "title": "fastppo policy heads (forward + backward)", "script": "benchmarks/bench_heads.py",
            "warnings": result["warnings"], "rows": rows,
            "details": {"torch_compile": result["compile_info"], "tolerance": TOLERANCE}}


# --- Main ----------------------------------------------------------------------------------------


def import_libraries():
    global torch, fastppo, peers
    import torch
    import fastppo
    peers = common.import_peers()


def benchmark_cases(mode, device):
    """The pytest benchmarks' cases (benchmarks/test_kernels.py)."""
    import_libraries()
    vs = {FASTPPO: None, **PEER_BASELINES}
    return [common.Case("heads", KERNELS[head], *size_of(head, rows, n), vs,
                        lambda head=head, rows=rows, n=n: case_contenders(head, rows, n, device, mode != "tiny")[0])
            for head, sizes in MODE_SIZES[mode].items() for rows, n in sizes]


def measure(args, own_cache):
    import_libraries()
    device, mode, sync = common.setup_device(args)
    compiling = mode != "tiny"
    compile_info = common.NOT_COMPILED
    if compiling:
        warm_inputs = {head: make_inputs(head, *WARMUP_COMPILE_SIZES[head], device, seed=0) for head in PEERS}
        warm_calls = {head: step_call(head, common.compile_fresh(peer), warm_inputs[head]) for head, peer in PEERS.items()}
        compile_info = common.compile_info(device, own_cache, "size", WARMUP_COMPILE_SIZE, warm_calls, sync)
    warnings = []
    rows = {}
    for head, head_sizes in MODE_SIZES[mode].items():
        for n_rows, n in head_sizes:
            contenders, grad_bytes = case_contenders(head, n_rows, n, device, compiling)
            rows[(head, n_rows, n)] = row = common.measure_case(contenders, device, f"{head} ({n_rows}, {n})", sync,
                                                                common.TIMING[mode], warnings)
            row.update(compile=row["first_call_ms"].get(COMPILED, common.NOT_COMPILED), grad_bytes=grad_bytes)
            del contenders
    return dict(device=device, mode=mode, machine=common.machine_info(device), sizes=MODE_SIZES[mode], rows=rows,
                compile_info=compile_info, warnings=warnings)


def main(argv=None):
    args = common.bench_parser(__doc__.splitlines()[0], "heads").parse_args(argv)
    result = common.with_cold_compile_cache(args, "bench_heads_inductor_", measure)
    return common.write_reports(args, result, "heads", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
