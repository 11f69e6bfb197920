"""Benchmark ``fastppo.ppo_loss`` against CleanRL's PPO loss in torch eager and under torch.compile.

Run from the repository root: ``python -m benchmarks.bench_loss`` writes benchmarks/results/loss_cpu.md;
``--quick`` (B = 64, 4096), ``--tiny`` (B = 64, no torch.compile), ``--threads``, ``--device cuda``,
``--out`` and ``--json`` as every bench script takes them (see benchmarks/_common.py).

For each batch size B it times one training step's worth of loss work, forward and backward: the
loss with every part (clipped surrogate, clipped value loss, entropy bonus with ent_coef=0.01,
and the stats approx_kl, old_approx_kl and clipfrac), then ``torch.autograd.grad`` of the loss
with respect to new_logprob, new_value and entropy (float32 leaf tensors of B elements). Contenders:
``fastppo.ppo_loss``; CleanRL's ppo.py loss written out in torch eager; the same function under
``torch.compile`` (inductor, ``dynamic=False``, compiled afresh for each B, its first call, the
compile, reported in its own table); and the memory-traffic floor, 10 float32 arrays of B (7 inputs
read, 3 gradients written) divided by the copy bandwidth measured in the same run. It also reports
each contender's peak extra memory during one call, and checks once per size that fastppo's (and
the compiled function's) loss and gradients match the eager formula.
"""

from __future__ import annotations

import sys

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_loss
except ImportError:
    import _common as common  # python benchmarks/bench_loss.py

# Imported by import_libraries(), after --threads has set OMP_NUM_THREADS and after
# TORCHINDUCTOR_CACHE_DIR is chosen.
torch = None
fastppo = None
peers = None

SIZES = {"full": [64, 512, 4096, 65536, 1048576], "quick": [64, 4096], "tiny": [64]}
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
GRADS = "3 gradients"  # the memory the returned gradients take: 3 * 4 * B bytes


# --- The peer and fastppo --------------------------------------------------------------------------


def cleanrl_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy):
    """CleanRL ppo.py's loss and stats (tests/peers.py) with this benchmark's coefficients
    (norm_adv, clip_vloss on; value clip = clip_coef)."""
    return peers.cleanrl_loss(newlogprob, oldlogprob, advantages, newvalue, oldvalue, returns, entropy,
                              clip_coef=CLIP_COEF, vf_coef=VF_COEF, ent_coef=ENT_COEF, clip_vloss=True)


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
        grads = torch.autograd.grad(loss, params)
        return {"loss": loss.detach(), "grad new_logprob": grads[0], "grad new_value": grads[1],
                "grad entropy": grads[2]}

    return call


def case_contenders(B, device, compiling):
    inputs = make_inputs(B, device, seed=B)
    calls = {FASTPPO: step_call(fastppo_loss, inputs), EAGER: step_call(cleanrl_loss, inputs),
             COMPILED: step_call(common.compile_fresh(cleanrl_loss), inputs) if compiling else common.NOT_COMPILED}
    return common.Contenders(calls, EAGER, TOLERANCE)


def floor_ms(B, bandwidth):
    """Time to read the 7 float32 inputs and write the 3 float32 gradients of B elements once."""
    return FLOOR_ARRAYS * B * 4 / bandwidth * 1e3


# --- Report --------------------------------------------------------------------------------------


def report(result):
    rows, device, mode = result["rows"], result["device"], result["mode"]
    ratio_columns = [(f"{EAGER} / {FASTPPO}", EAGER, FASTPPO), (f"{COMPILED} / {FASTPPO}", COMPILED, FASTPPO)]
    time_columns = CONTENDERS + [FLOOR]
    lines = [f"# fastppo.ppo_loss benchmark ({device})", ""]
    lines += common.mode_banner(mode, f"B in {result['sizes']}", compiles=True) + ["## Machine", ""]
    lines += common.machine_head(result["machine"]) + [f"- torch.compile: {result['compile_info']}",
                                            common.bandwidth_line(device, result["bandwidth"]), ""]
    lines += ["## Median time per forward + backward call (ms, lower is better)", ""] + common.table(
        ["B"] + time_columns + [name for name, _, _ in ratio_columns] + [f"{FASTPPO} / {FLOOR}"],
        "|---:|" + "---:|" * (len(time_columns) + len(ratio_columns) + 1),
        [[str(B)] + [common.fmt(row[c]) for c in time_columns]
         + [common.ratio(row, num, den) for _, num, den in ratio_columns + [(None, FASTPPO, FLOOR)]]
         for B, row in rows.items()])
    lines += [""] + ([f"**{w}**" for w in result["warnings"]] or [
        "Checks: at every B, fastppo's " + ("" if mode == "tiny" else "and the compiled function's ")
        + f"loss and three gradients matched {EAGER}'s to {TOLERANCE:g} relative (max |difference| / max |eager|)."])
    lines += ["", f"## {COMPILED}: compile time (first call at each B, not in the table above)", ""]
    lines += common.compile_table(rows, lambda B: [str(B)], ["B"], "|---:|", EAGER, COMPILED)
    lines += ["", "## Peak extra memory during one forward + backward call (lower is better)", ""] + common.table(
        ["B"] + CONTENDERS + [GRADS] + [name for name, _, _ in ratio_columns],
        "|---:|" + "---:|" * (len(CONTENDERS) + 1 + len(ratio_columns)),
        [[str(B)] + [common.fmt_bytes(row["memory"][c]) for c in CONTENDERS] + [common.fmt_bytes(3 * 4 * B)]
         + [common.ratio(row["memory"], num, den) for _, num, den in ratio_columns] for B, row in rows.items()])
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
        "block of consecutive calls; each case is the median of " + common.TIMING_NOTES[mode],
        f"- `{EAGER}`: CleanRL ppo.py's loss lines in plain torch; its stats are computed under no_grad as "
        "CleanRL does but left as tensors (CleanRL's `.item()` would synchronize; fastppo returns tensors too).",
        f"- `{COMPILED}`: the same function under `torch.compile(..., dynamic=False)` (inductor). Dynamo's caches "
        "are reset before each B, so each B compiles once, forward and backward graphs, with one cache entry "
        "in use while it is timed. Its first call at each B (the compile, measured with time.perf_counter) is "
        "the compile table's column; a one-time warm-up compile at "
        f"B={WARMUP_COMPILE_SIZE} first absorbs process-wide setup (imports, compile workers).",
        common.threads_note(device, "eager torch ops and inductor's C++ kernels use torch's threads"),
        common.memory_note(device),
        f"- `{GRADS}`: 3 * 4 * B bytes, what the three returned gradients take when each is a full array; "
        "they are part of every contender's figure (a gradient returned as a broadcast view, as the entropy's "
        "constant gradient can be, takes no array).",
        f"- `{FLOOR}`: {FLOOR_ARRAYS} float32 arrays of B (7 inputs read, 3 gradients written) divided by the copy "
        "bandwidth above. Small cases fit in cache and are bound by per-call overhead, where this floor means little.",
    ]
    return "\n".join(lines) + "\n"


def to_json(result):
    """This benchmark's summary and rows, for the --json file (``common.write_reports``)."""
    rows = [common.json_row("ppo_loss", f"B={B}", {"B": B}, row, [FASTPPO], PEER_BASELINES, floor_ms=row[FLOOR],
                            compile_first_call_ms=row["compile"], peak_extra_bytes=row["memory"])
            for B, row in result["rows"].items()]
    details = {"copy_bandwidth_gb_s": result["bandwidth"] / 1e9, "torch_compile": result["compile_info"],
               "clip_coef": CLIP_COEF, "vf_coef": VF_COEF, "ent_coef": ENT_COEF, "tolerance": TOLERANCE}
    return {"name": "ppo_loss", "title": "fastppo.ppo_loss (forward + backward)", "script": "benchmarks/bench_loss.py",
            "warnings": result["warnings"], "details": details, "rows": rows}


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
    return [common.Case("loss", "ppo_loss", f"B={B}", {"B": B}, vs,
                        lambda B=B: case_contenders(B, device, compiling=mode != "tiny"))
            for B in SIZES[mode]]


def measure(args, own_cache):
    import_libraries()
    device, mode, sync = common.setup_device(args)
    compiling = mode != "tiny"
    bandwidth = common.copy_bandwidth(device, mode)
    compile_info = common.NOT_COMPILED
    if compiling:
        warm_call = step_call(common.compile_fresh(cleanrl_loss), make_inputs(WARMUP_COMPILE_SIZE, device, seed=0))
        compile_info = common.compile_info(device, own_cache, "B", f"B={WARMUP_COMPILE_SIZE}", {"": warm_call}, sync)
    warnings = []
    rows = {}
    for B in SIZES[mode]:
        rows[B] = row = common.measure_case(case_contenders(B, device, compiling), device, f"B={B}", sync,
                                            common.TIMING[mode], warnings)
        row.update({"compile": row["first_call_ms"].get(COMPILED, common.NOT_COMPILED), FLOOR: floor_ms(B, bandwidth)})
    return dict(device=device, mode=mode, machine=common.machine_info(device), sizes=SIZES[mode], rows=rows,
                bandwidth=bandwidth, compile_info=compile_info, warnings=warnings)


def main(argv=None):
    args = common.bench_parser(__doc__.splitlines()[0], "loss").parse_args(argv)
    result = common.with_cold_compile_cache(args, "bench_loss_inductor_", measure)
    return common.write_reports(args, result, "loss", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
