"""Benchmark fastppo's RLHF pieces against TRL's PPO pieces, in time and peak memory.

Run from the repository root: ``python -m benchmarks.bench_rlhf`` writes benchmarks/results/rlhf_cpu.md;
``--quick`` (smaller sizes), ``--tiny`` (smallest sizes), ``--threads``, ``--device cuda``, ``--out``
and ``--json`` as every bench script takes them (see benchmarks/_common.py).

Four pieces of a PPO step for language models, each on the same inputs for fastppo and its peers,
in the same process:

1. log-prob (and entropy) of the sampled tokens from the policy's logits ``[B, T, V]`` at sampling
   temperature 0.7, forward and backward: ``fastppo.categorical_logprob_entropy(logits, tokens,
   temperature=0.7)`` against TRL's PPO trainer's way (divide the logits by temperature + 1e-7,
   ``trl.trainer.utils.selective_log_softmax``, entropy ``logsumexp(x) - sum(softmax(x) * x)``)
   and against TRL's ``selective_log_softmax_and_entropy(logits, tokens, temperature=0.7)``;
2. reward shaping: ``fastppo.rlhf.kl_penalty_rewards`` (k1 estimator) against the PPO trainer's
   lines (padding log-probs filled, kl, ``-kl_coef * kl``, the score added at the last token);
3. GAE over the response tokens: ``fastppo.rlhf.token_gae`` against the trainer's reversed Python
   loop over T;
4. whitening of the advantages: ``fastppo.rlhf.masked_whiten`` against TRL's masked_whiten
   (masked mean, masked variance with Bessel's correction, ``(x - mean) * rsqrt(var + 1e-8)``).

TRL 1.x no longer ships its PPO trainer nor masked_whiten; the trainer's lines for pieces 2-4 were
never functions. Those peers are TRL's formulas written out in this script (named so in the
tables); a masked_whiten found in the installed TRL is used instead of the re-implementation.
Responses are ragged: each row's length is uniform in [T/4, T], right-padded. Every contender is
checked against fastppo before it is timed; a mismatch is a warning in the report.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time
import warnings as pywarnings

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_rlhf
except ImportError:
    import _common as common  # python benchmarks/bench_rlhf.py

# Imported by import_libraries(), after --threads has set OMP_NUM_THREADS.
torch = None
fastppo = None
rlhf = None

LOGPROB = "logprob"
SHAPING = "shaping"
GAE = "gae"
WHITEN = "whiten"
PIECES = [LOGPROB, SHAPING, GAE, WHITEN]
TITLES = {
    LOGPROB: "1. Per-token log-prob and entropy from logits (forward + backward)",
    SHAPING: "2. Reward shaping: per-token KL penalty plus the score",
    GAE: "3. GAE over response tokens",
    WHITEN: "4. Whitening of the advantages",
}
KERNELS = {  # fastppo's function for each piece (the JSON rows' "kernel")
    LOGPROB: "categorical_logprob_entropy",
    SHAPING: "rlhf.kl_penalty_rewards",
    GAE: "rlhf.token_gae",
    WHITEN: "rlhf.masked_whiten",
}

# (B, T, V) for piece 1; (B, T) for pieces 2-4. float32 logits of B*T*V elements: 1 GiB at the largest.
SIZES = {
    LOGPROB: [(2, 512, 32000), (1, 2048, 32000), (1, 512, 128256), (1, 2048, 128256)],
    **{piece: [(64, 512), (64, 2048), (512, 512), (512, 2048)] for piece in (SHAPING, GAE, WHITEN)},
}
QUICK_SIZES = {
    LOGPROB: [(1, 512, 32000), (1, 128, 128256)],
    **{piece: [(64, 512), (512, 2048)] for piece in (SHAPING, GAE, WHITEN)},
}
TINY_SIZES = {
    LOGPROB: [(1, 64, 32000)],  # scaled down from the smallest full case, so that --tiny takes seconds
    **{piece: [min(SIZES[piece], key=lambda s: s[0] * s[1])] for piece in (SHAPING, GAE, WHITEN)},
}
CHECK_ONLY_SIZE = (7, 37)  # pieces 2-4 are also checked (not timed) at odd sizes first

TEMPERATURE = 0.7  # TRL's PPO default sampling temperature
TEMPERATURE_EPS = 1e-7  # TRL's PPO trainer divides by temperature + 1e-7
ENT_COEF = 0.01  # the entropy term's weight in the loss whose gradient is taken
BETA = 0.05  # TRL's PPO default kl_coef
GAMMA = 1.0
LAM = 0.95
WHITEN_EPS = 1e-8
INVALID_LOGPROB = 1.0  # what TRL's PPO trainer writes into padding log-probs (so kl is 0 there)
TOLERANCE = 1e-4  # relative difference allowed: max |fastppo - peer| / max |peer|
MEMORY_FACTOR = 8  # piece 1 is skipped unless 8 * B*T*V*4 bytes are available (CPU): the peers' peak

FASTPPO = "fastppo"
TRL_PPO_WAY = "TRL PPOTrainer way"  # real selective_log_softmax + the trainer's entropy formula
TRL_SLSE = "TRL selective_log_softmax_and_entropy"
REIMPL = "TRL formula (re-implemented)"
TRL_WHITEN = "TRL masked_whiten"
GRADS = "gradient size"  # bytes of the logits' gradient, B*T*V*4


# --- TRL: what the installed version offers -------------------------------------------------------


def load_trl():
    """``(info, functions)``: a line saying which TRL is used, and the TRL functions found.

    functions may hold "selective_log_softmax", "selective_log_softmax_and_entropy" and
    "masked_whiten"; it is empty when TRL is not installed (or fails to import).
    """
    trl_utils = common.import_peer("trl.trainer.utils")
    if isinstance(trl_utils, str):
        return trl_utils, {}
    import trl

    functions = {}
    for name in ("selective_log_softmax", "selective_log_softmax_and_entropy"):
        if hasattr(trl_utils, name):
            functions[name] = getattr(trl_utils, name)
    # TRL < 1.0 kept masked_whiten in one of these modules; TRL 1.x has none.
    for module in ("trl.trainer.utils", "trl.core", "trl.trainer.ppo_trainer", "trl.experimental.ppo.ppo_trainer"):
        try:
            with pywarnings.catch_warnings():  # importing trl.experimental warns that it is experimental
                pywarnings.simplefilter("ignore")
                fn = getattr(importlib.import_module(module), "masked_whiten", None)
        except Exception:
            fn = None
        if fn is not None:
            functions["masked_whiten"] = fn
            functions["masked_whiten_module"] = module
            break
    return f"trl {trl.__version__}", functions


def trl_kernel_path(device):
    """Which path TRL's log-prob functions take on this device: its Triton kernel or torch ops."""
    try:
        import trl.trainer.utils as trl_utils
    except Exception:
        return "-"
    triton = getattr(trl_utils, "is_triton_available", lambda: False)()
    if device == "cuda" and triton:
        return "TRL's fused Triton kernel (trl.kernels) for float32 logits on CUDA"
    return "torch ops (TRL's fallback: Triton " + ("not installed" if not triton else "is GPU-only") + ")"


# --- The peers, written out here (TRL's formulas; TRL's code is not copied) -----------------------


def gathered_logprob(x, tokens):
    """log softmax(x)[token] as TRL computes it for float32: x[token] - logsumexp(x), the
    logsumexp taken one batch row at a time (TRL's loop that bounds its temporary memory)."""
    picked = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    norms = torch.stack([torch.logsumexp(row, dim=-1) for row in x])
    return picked - norms


def ppo_way(selective_log_softmax):
    """TRL's PPO trainer's training-step log-prob and entropy: logits divided by temperature +
    1e-7, the sampled tokens' log-prob, entropy = logsumexp(x) - sum_i softmax(x)_i * x_i."""

    def head(logits, tokens):
        x = logits / (TEMPERATURE + TEMPERATURE_EPS)  # TRL divides in place; a leaf cannot be (see the notes)
        logprob = selective_log_softmax(x, tokens)
        probs = torch.softmax(x, dim=-1)
        entropy = torch.logsumexp(x, dim=-1) - (probs * x).sum(-1)
        return logprob, entropy

    return head


def trl_reward_shaping(logprob, ref_logprob, padding_mask, last_index, scores, beta):
    """The PPO trainer's rewards: padding log-probs set to INVALID_LOGPROB (kl 0 there), k1 kl,
    non-score reward -beta * kl, and each response's score added at its last token."""
    logprob = torch.masked_fill(logprob, padding_mask, INVALID_LOGPROB)
    ref_logprob = torch.masked_fill(ref_logprob, padding_mask, INVALID_LOGPROB)
    kl = logprob - ref_logprob
    rewards = (-beta * kl).clone()  # the trainer keeps -beta * kl as non_score_reward and adds to a copy
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index] += scores
    return rewards, kl


def trl_token_gae(rewards, values, padding_mask, gamma, lam):
    """The PPO trainer's GAE: values zeroed at padding, then a reversed Python loop over the T
    token columns (no bootstrap after the last column), advantages stacked back into [B, T]."""
    values = torch.masked_fill(values, padding_mask, 0.0)
    T = rewards.shape[1]
    running = 0.0
    backwards = []
    for t in range(T - 1, -1, -1):
        following = values[:, t + 1] if t + 1 < T else 0.0
        running = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * running
        backwards.append(running)
    backwards.reverse()
    advantages = torch.stack(backwards, dim=1)
    return advantages, advantages + values


def trl_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def trl_masked_var(x, mask):
    """TRL's unbiased masked variance: the masked mean of the squared deviations times n / (n - 1),
    after a Python-level check that n is not 0 (a host sync on CUDA)."""
    deviation = x - trl_masked_mean(x, mask)
    var = trl_masked_mean(deviation * deviation, mask)
    n = mask.sum()
    if n == 0:
        raise ValueError("masked_var: no selected element")
    return var * (n / (n - 1))


def trl_masked_whiten(x, mask):
    """TRL's masked_whiten with shift_mean: ``(x - mean) * rsqrt(var + 1e-8)``, the mean and the
    variance taken by the two helpers above (so the mean is computed twice, as in TRL)."""
    mean, var = trl_masked_mean(x, mask), trl_masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS)


# --- Inputs and contenders ------------------------------------------------------------------------


def ragged_mask(B, T, g, device):
    """Right-padded responses: row b holds lengths[b] real tokens, uniform in [T/4, T]."""
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return mask.to(device), (lengths - 1).to(device)


def logprob_inputs(B, T, V, device, seed):
    """Float32 logits 2 N(0, 1) [B, T, V] (a leaf), int64 tokens uniform in [0, V), the mask
    (as float weights of the loss)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float32).mul_(2.0)
    tokens = torch.randint(0, V, (B, T), generator=g, dtype=torch.int64)
    mask, _ = ragged_mask(B, T, g, "cpu")
    return logits.to(device).requires_grad_(True), tokens.to(device), mask.to(device=device, dtype=torch.float32)


def logprob_call(head, inputs):
    """The timed call: the head, then the gradient of sum(mask * (logprob + 0.01 entropy)) w.r.t. the logits."""
    logits, tokens, weights = inputs

    def call():
        logprob, entropy = head(logits, tokens)
        (grad,) = torch.autograd.grad(((logprob + ENT_COEF * entropy) * weights).sum(), [logits])
        return {"logprob": logprob.detach(), "entropy": entropy.detach(), "grad logits": grad}

    return call


def logprob_contenders(trl_functions):
    """``{column: head(logits, tokens) -> (logprob, entropy)}``, or ``{column: reason}``."""
    contenders = {
        FASTPPO: lambda logits, tokens: fastppo.categorical_logprob_entropy(logits, tokens, temperature=TEMPERATURE)
    }
    if "selective_log_softmax" in trl_functions:
        contenders[TRL_PPO_WAY] = ppo_way(trl_functions["selective_log_softmax"])
    else:  # TRL is not installed: its formula, written out in this script
        contenders[REIMPL] = ppo_way(gathered_logprob)
    if "selective_log_softmax_and_entropy" in trl_functions:
        fn = trl_functions["selective_log_softmax_and_entropy"]
        contenders[TRL_SLSE] = lambda logits, tokens: fn(logits, tokens, temperature=TEMPERATURE)
    else:
        contenders[TRL_SLSE] = "not in this TRL" if trl_functions else "TRL not installed"
    return contenders


def token_inputs(B, T, device, seed):
    """The [B, T] float32 tensors of one batch of responses, and the masks every contender needs."""
    g = torch.Generator().manual_seed(seed)
    mask, last_index = ragged_mask(B, T, g, device)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device)

    logprob = -randn(B, T).abs() * 2  # log-probs of sampled tokens: <= 0
    ref_logprob = logprob + 0.3 * randn(B, T)
    values = randn(B, T)
    scores = randn(B)
    # Inputs of pieces 3 and 4: shaped rewards (0 at padding) and advantages (0 at padding).
    rewards = rlhf.kl_penalty_rewards(logprob, ref_logprob, mask, scores, BETA, "k1").rewards
    advantages = rlhf.token_gae(rewards, values, last_index, GAMMA, LAM)[0]
    return dict(
        mask=mask, padding_mask=~mask, last_index=last_index, logprob=logprob, ref_logprob=ref_logprob,
        values=values, scores=scores, rewards=rewards, advantages=advantages,
    )


def logprob_case(inputs, trl_functions):
    heads = logprob_contenders(trl_functions)
    calls = {c: h if isinstance(h, str) else logprob_call(h, inputs) for c, h in heads.items()}
    return common.Contenders(calls, FASTPPO, TOLERANCE)


def token_contenders(piece, x, trl_functions):
    """The contenders of pieces 2-4: each call returns ``{output name: tensor}``; the outputs whose
    names end with ``@real`` are compared at real tokens only."""
    if piece == SHAPING:
        def fast():
            out = rlhf.kl_penalty_rewards(x["logprob"], x["ref_logprob"], x["mask"], x["scores"], BETA, "k1")
            return {"rewards": out.rewards, "kl": out.kl}

        def peer():
            rewards, kl = trl_reward_shaping(
                x["logprob"], x["ref_logprob"], x["padding_mask"], x["last_index"], x["scores"], BETA
            )
            return {"rewards": rewards, "kl": kl}

        return token_case({FASTPPO: fast, REIMPL: peer}, x["mask"])
    if piece == GAE:
        def fast():
            adv, ret = rlhf.token_gae(x["rewards"], x["values"], x["last_index"], GAMMA, LAM)
            return {"advantages@real": adv, "returns@real": ret}

        def peer():
            adv, ret = trl_token_gae(x["rewards"], x["values"], x["padding_mask"], GAMMA, LAM)
            return {"advantages@real": adv, "returns@real": ret}

        return token_case({FASTPPO: fast, REIMPL: peer}, x["mask"])

    def fast():
        return {"whitened@real": rlhf.masked_whiten(x["advantages"], x["mask"])}

    if "masked_whiten" in trl_functions:
        fn, column = trl_functions["masked_whiten"], TRL_WHITEN
    else:
        fn, column = trl_masked_whiten, REIMPL

    def peer():
        # As the trainer uses it: whiten over the real tokens, then zero the padding.
        whitened = fn(x["advantages"], x["mask"])
        return {"whitened@real": torch.masked_fill(whitened, x["padding_mask"], 0.0)}

    return token_case({FASTPPO: fast, column: peer}, x["mask"])


def token_case(calls, mask):
    def outputs_of(column, out):
        return {name.removesuffix("@real"): x[mask] if name.endswith("@real") else x for name, x in out.items()}

    return common.Contenders(calls, FASTPPO, TOLERANCE, outputs_of=outputs_of)


def memory_shortfall(B, T, V, device):
    """Why piece 1 cannot run at (B, T, V) here: on the CPU it needs MEMORY_FACTOR * B*T*V*4 bytes
    of MemAvailable (/proc/meminfo); None when it can (or when that cannot be read)."""
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return None
    need = MEMORY_FACTOR * B * T * V * 4
    return f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available" if free < need else None


def piece_columns(piece, trl_functions):
    """A piece's columns, fastppo's first."""
    if piece == LOGPROB:
        return list(logprob_contenders(trl_functions))
    return [FASTPPO, TRL_WHITEN if piece == WHITEN and "masked_whiten" in trl_functions else REIMPL]


def case_contenders(piece, key, device, trl_functions):
    """The contenders of one piece at one size: (B, T, V) for piece 1, (B, T) for the others."""
    if piece != LOGPROB:
        B, T = key
        return token_contenders(piece, token_inputs(B, T, device, seed=B * 1_000_003 + T), trl_functions)
    B, T, V = key
    reason = memory_shortfall(B, T, V, device)
    if reason is not None:
        return common.Contenders(dict.fromkeys(piece_columns(piece, trl_functions), reason), FASTPPO, TOLERANCE)
    return logprob_case(logprob_inputs(B, T, V, device, seed=B * 1_000_003 + T * 101 + V), trl_functions)


def case_name(piece, key):
    return ", ".join(f"{k}={v}" for k, v in zip(("B", "T", "V") if piece == LOGPROB else ("B", "T"), key))


# --- Measurement ----------------------------------------------------------------------------------


def run_piece(piece, sizes, device, sync, timing, trl_functions, warnings):
    """``{key: row}``: each size checked (every peer against fastppo; that call is each one's first
    warm-up), then each contender timed and its peak extra memory measured. Pieces 2-4 are first
    checked, not timed, at CHECK_ONLY_SIZE."""
    rows = {}
    for i, key in enumerate(([] if piece == LOGPROB else [CHECK_ONLY_SIZE]) + list(sizes)):
        label = f"{piece} {case_name(piece, key)}"
        contenders = case_contenders(piece, key, device, trl_functions)
        if not contenders.runnable():
            rows[key] = {"skipped": contenders.calls[FASTPPO]}
            print(f"{label}: {rows[key]['skipped']}", file=sys.stderr)
        elif piece != LOGPROB and i == 0:
            warnings += contenders.check(label)[0]
        else:
            rows[key] = common.measure_case(contenders, device, label, sync, timing, warnings)
            if piece == LOGPROB:
                rows[key]["grad_bytes"] = key[0] * key[1] * key[2] * 4
        del contenders
        gc.collect()
    return rows


def import_libraries():
    global torch, fastppo, rlhf
    import torch
    import fastppo
    import fastppo.rlhf.kernels as rlhf


def benchmark_cases(mode, device):
    """The pytest benchmarks' cases (benchmarks/test_kernels.py)."""
    import_libraries()
    trl_functions = load_trl()[1]
    sizes = {"full": SIZES, "quick": QUICK_SIZES, "tiny": TINY_SIZES}[mode]
    return [common.Case("rlhf", KERNELS[piece], case_name(piece, key), dict(zip(("B", "T", "V"), key)),
                        {c: None if c == FASTPPO else FASTPPO for c in piece_columns(piece, trl_functions)},
                        lambda piece=piece, key=key: case_contenders(piece, key, device, trl_functions))
            for piece in PIECES for key in sizes[piece]]


def cpu_snapshot():
    """(wall s, machine busy CPU s from /proc/stat or None, this process's CPU s), to tell how much
    of the machine other processes used during the run (this machine may be shared)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    times = os.times()
    return time.perf_counter(), busy, times.user + times.system


def others_cpu_share(start, end):
    """Fraction of the machine's cores busy with other processes between two cpu_snapshot()s."""
    if start[1] is None or end[1] is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(others, 0.0) / (wall * (os.cpu_count() or 1))


def collect(args):
    """Runs the benchmark that ``args`` describes and returns its measurements."""
    common.threads_env(args)
    import_libraries()
    snapshot = cpu_snapshot()
    device, mode, sync = common.setup_device(args)
    sizes = {"full": SIZES, "quick": QUICK_SIZES, "tiny": TINY_SIZES}[mode]
    trl_info, trl_functions = load_trl()
    print(f"peer: {trl_info}", file=sys.stderr)
    warnings = []
    timing = common.TIMING[mode]
    pieces = {piece: {"columns": piece_columns(piece, trl_functions),
                      "rows": run_piece(piece, sizes[piece], device, sync, timing, trl_functions, warnings)}
              for piece in PIECES}
    transformers = sys.modules.get("transformers")
    return dict(
        device=device, mode=mode, machine=common.machine_info(device), sizes=sizes, pieces=pieces, warnings=warnings,
        trl=trl_info,
        others_cpu=others_cpu_share(snapshot, cpu_snapshot()),
        trl_whiten_module=trl_functions.get("masked_whiten_module"), trl_path=trl_kernel_path(device),
        transformers="not imported" if transformers is None else getattr(transformers, "__version__", "-"),
    )


# --- Report ---------------------------------------------------------------------------------------


def key_cells(piece, key):
    return [str(k) for k in key] + ([str(key[0] * key[1])] if piece == LOGPROB else [])  # with piece 1's tokens


def key_header(piece):
    return (["B", "T", "V", "tokens"], "|---:|---:|---:|---:|") if piece == LOGPROB else (["B", "T"], "|---:|---:|")


def machine_lines(result):
    peer = (
        f"- Peer: {result['trl']} (transformers {result['transformers']}); TRL's log-prob functions ran on "
        f"{result['trl_path']}"
        if result["trl"].startswith("trl ")
        else f"- Peer: TRL {result['trl']}: every TRL column is TRL's formula re-implemented in this script"
    )
    return common.machine_head(result["machine"], peer_line=peer) + [
        "- Other processes' CPU use during the run: "
        + ("n/a" if result["others_cpu"] is None
           else f"{100 * result['others_cpu']:.0f}% of the {os.cpu_count()} cores")
        + " (busy time in /proc/stat minus this process's own CPU time; above a few % the timings are noisy)",
    ]


def report(result):
    device, mode, pieces, sizes = result["device"], result["mode"], result["pieces"], result["sizes"]
    lines = [f"# fastppo RLHF pieces vs TRL's PPO pieces ({device})", ""]
    lines += common.mode_banner(mode, "; ".join(f"{piece} {sizes[piece]}" for piece in PIECES))
    lines += ["## Machine", ""] + machine_lines(result) + ["", "## Median time per call (ms, lower is better)", ""]
    for piece in PIECES:
        columns, (header, rule) = pieces[piece]["columns"], key_header(piece)
        ratio_columns = [(f"{p} / {FASTPPO}", p, FASTPPO) for p in columns if p != FASTPPO]
        cells = []
        for key, row in pieces[piece]["rows"].items():
            if "skipped" in row:
                cells.append(key_cells(piece, key) + [row["skipped"]] + ["-"] * (len(columns) + len(ratio_columns) - 1))
            else:
                cells.append(key_cells(piece, key) + [common.fmt(row[c]) for c in columns]
                             + [common.ratio(row, num, den) for _, num, den in ratio_columns])
        lines += [f"### {TITLES[piece]}", ""] + common.table(
            header + columns + [name for name, _, _ in ratio_columns],
            rule + "---:|" * (len(columns) + len(ratio_columns)), cells) + [""]
    lines += ["## Peak extra memory during one call (lower is better)", ""]
    for piece in PIECES:
        columns, (header, rule) = pieces[piece]["columns"], key_header(piece)
        extra = [GRADS] if piece == LOGPROB else []
        ratio_columns = [(f"{FASTPPO} / {GRADS}", FASTPPO, GRADS)] if piece == LOGPROB else []
        ratio_columns += [(f"{p} / {FASTPPO}", p, FASTPPO) for p in columns if p != FASTPPO]
        memory = {key: dict(row["memory"], **({GRADS: row["grad_bytes"]} if extra else {}))
                  for key, row in pieces[piece]["rows"].items() if "skipped" not in row}
        lines += [f"### {TITLES[piece]}", ""] + common.table(
            header + columns + extra + [name for name, _, _ in ratio_columns],
            rule + "---:|" * (len(columns) + len(extra) + len(ratio_columns)),
            [key_cells(piece, key) + [common.fmt_bytes(mem[c]) for c in columns + extra]
             + [common.ratio(mem, num, den) for _, num, den in ratio_columns] for key, mem in memory.items()]) + [""]
    lines += ["## Checks", ""] + ([f"- **{w}**" for w in result["warnings"]] or [
        f"- fastppo matched every peer to {TOLERANCE:g} relative (max |fastppo - peer| / max |fastppo|) at every size "
        f"above, and at (B, T) = {CHECK_ONLY_SIZE} for pieces 2-4: log-prob, entropy and the logits' gradient; "
        "rewards and kl (every position); advantages, returns and whitened advantages (at real tokens)."])
    worst = {}
    for piece in PIECES:
        for row in pieces[piece]["rows"].values():
            for column, diffs in row.get("max_rel_diff", {}).items():
                for name, diff in diffs.items():
                    worst[(column, name)] = max(worst.get((column, name), 0.0), diff)
    if worst:
        lines.append("- Largest relative difference seen, per output: " + "; ".join(
            f"{name} vs {column} {diff:.2g}" for (column, name), diff in worst.items()) + ".")
    return "\n".join(lines + [""] + notes(result)) + "\n"


def notes(result):
    device, mode = result["device"], result["mode"]
    ppo_column = TRL_PPO_WAY if TRL_PPO_WAY in result["pieces"][LOGPROB]["columns"] else REIMPL
    whiten_column = [c for c in result["pieces"][WHITEN]["columns"] if c != FASTPPO][0]
    installed = not result["trl"].startswith(("not installed", "import failed"))
    lines = [
        "## Notes",
        "",
        f"- Peer: {result['trl']}. " + (
            "TRL 1.x ships no PPO trainer (nor any of its masked_mean / masked_var / masked_whiten helpers): "
            "the reward shaping, the GAE loop and the whitening were inline lines of `PPOTrainer.train()` (and "
            "helpers) in TRL before 1.0. The columns named `" + REIMPL + "` are those formulas written out in "
            "this script (not TRL's code). TRL's own functions are used where the installed TRL has them: "
            "`trl.trainer.utils.selective_log_softmax` and `selective_log_softmax_and_entropy`"
            + (f", and `masked_whiten` from `{result['trl_whiten_module']}`" if result["trl_whiten_module"] else "")
            + "."
            if installed else
            "TRL is not installed, so every TRL column is TRL's formula written out in this script "
            f"(`{REIMPL}`), and `{TRL_SLSE}` is left out."
        ),
        "- Inputs are float32. Each case is the median of " + common.TIMING_NOTES[mode]
        + " Each contender is timed in its own block of consecutive calls, all in this process.",
        "- Responses are ragged: row b has a length uniform in [T/4, T] and is right-padded; `mask` [B, T] is True "
        "at real tokens.",
        "",
        f"**{TITLES[LOGPROB]}.** float32 logits = 2 N(0, 1) of [B, T, V] (a leaf with requires_grad), int64 "
        f"tokens uniform in [0, V), temperature {TEMPERATURE}. The timed call is the head, then "
        f"`torch.autograd.grad(((logprob + {ENT_COEF} * entropy) * mask).sum(), [logits])`, the same for every "
        "contender (TRL's PPO trainer puts only the log-prob in its loss and computes the entropy for its stats; "
        "the entropy term here makes every contender differentiate both).",
        f"- `{FASTPPO}`: `fastppo.categorical_logprob_entropy(logits, tokens, temperature={TEMPERATURE})`: one "
        "streaming pass per token in forward, saving one log-sum-exp and the entropy per token; backward "
        "writes the logits' gradient in one more pass.",
        f"- `{ppo_column}`: what TRL's PPO trainer does in its training step: `x = logits / (temperature + 1e-7)`, "
        + ("`trl.trainer.utils.selective_log_softmax(x, tokens)` (gather minus a row-by-row logsumexp)"
           if ppo_column == TRL_PPO_WAY else "the sampled token's `x[token] - logsumexp(x)` (logsumexp row by row)")
        + ", `entropy = logsumexp(x) - (softmax(x) * x).sum(-1)`. TRL divides the model's output in place "
        "(`logits /= ...`); here the logits are a leaf, which autograd does not let be modified in place, so "
        "the division makes one more [B, T, V] tensor, counted in its memory (up to B*T*V*4 bytes more than "
        "TRL's in-place division). The 1e-7 changes the temperature by 1.4e-7 relative, far below the tolerance.",
        f"- `{TRL_SLSE}`: TRL 1.x's `selective_log_softmax_and_entropy(logits, tokens, temperature={TEMPERATURE})` "
        "(what its current trainers call); without Triton (or off CUDA) it divides the logits, takes "
        "`selective_log_softmax` and `entropy_from_logits` (log_softmax over chunks of 128 rows); on CUDA with "
        "Triton it runs TRL's fused kernel.",
        f"- Memory `{GRADS}`: B*T*V*4 bytes, the logits' gradient every contender returns (part of each figure).",
        "",
        f"**{TITLES[SHAPING]}.** log-prob = -2|N(0, 1)|, ref log-prob = log-prob + 0.3 N(0, 1), one score "
        f"N(0, 1) per response, beta (TRL's kl_coef) = {BETA}, the k1 estimator.",
        f"- `{FASTPPO}`: `fastppo.rlhf.kl_penalty_rewards(logprob, ref_logprob, mask, scores, {BETA}, \"k1\")`: one "
        "pass writes rewards, kl and each response's last index (it finds the last real token from the mask).",
        f"- `{REIMPL}`: TRL's PPO trainer's lines: log-prob and ref log-prob filled with INVALID_LOGPROB = 1.0 "
        "at padding (`masked_fill`), `kl = logprob - ref_logprob`, `-kl_coef * kl`, a copy of that as the "
        "rewards, the score added at `rewards[arange(B), last_index]`. Its `padding_mask = ~mask` and "
        "`last_index` (TRL's sequence_lengths) are given, computed before timing, as TRL has them by then.",
        "- The score's position: TRL's trainer adds it at `sequence_lengths + 1` (the first padding token) when "
        "that exists and keeps the value estimate there; here both contenders put it at the last real token "
        "(fastppo's convention), so the outputs can be compared. The work is the same either way.",
        "",
        f"**{TITLES[GAE]}.** Inputs: the shaped rewards of piece 2 (0 at padding) and values N(0, 1) [B, T], "
        f"gamma {GAMMA}, lam {LAM} (TRL's defaults).",
        f"- `{FASTPPO}`: `fastppo.rlhf.token_gae(rewards, values, last_index, {GAMMA}, {LAM})`: one backward "
        "sweep per response over its contiguous tokens, ending (no bootstrap) at its last token; 0 at padding.",
        f"- `{REIMPL}`: TRL's PPO trainer's loop: values zeroed at padding (`masked_fill`), then for t = T-1 "
        "down to 0 `delta = r[:, t] + gamma * V[:, t+1] - V[:, t]`, `lastgaelam = delta + gamma * lam * "
        "lastgaelam` (a handful of torch ops on B elements per token column), then `stack` and `returns = "
        "advantages + values`. (TRL zeroes values only after `sequence_lengths + 1`, matching its score "
        "position; see piece 2.)",
        "- Compared at real tokens (advantages and returns).",
        "",
        f"**{TITLES[WHITEN]}.** Input: the advantages of piece 3 (0 at padding), whitened over the real tokens.",
        f"- `{FASTPPO}`: `fastppo.rlhf.masked_whiten(advantages, mask)` (unbiased variance, eps 1e-8, 0 at padding); "
        "its statistics are reduced in a fixed order in float64.",
        f"- `{whiten_column}`: "
        + ("TRL's own masked_whiten" if whiten_column == TRL_WHITEN else "TRL's masked_whiten formula")
        + ": `masked_mean(x, m) = sum(x * m) / sum(m)`, `masked_var = masked_mean((x - masked_mean(x, m))^2, m) * "
        "n / (n - 1)` (after a Python check that n != 0, a host sync on CUDA), `(x - masked_mean(x, m)) * "
        "rsqrt(masked_var + 1e-8)` (the mean is computed twice, as in TRL; the mask is a bool tensor), then "
        "`masked_fill(padding_mask, 0)` as the trainer does next.",
        "- Compared at real tokens.",
        "",
        common.memory_note(device),
        common.threads_note(device, "torch ops use torch's threads"),
        f"- Piece 1 is skipped at a size where less than {MEMORY_FACTOR} * B*T*V*4 bytes of memory are available "
        "(CPU), which the table then says.",
    ]
    return lines


# --- JSON -----------------------------------------------------------------------------------------


def to_json(result):
    """This benchmark's summary and rows (one kernel per piece), for the --json file (``common.write_reports``)."""
    rows = []
    for piece in PIECES:
        columns = result["pieces"][piece]["columns"]
        peers = {c: FASTPPO for c in columns if c != FASTPPO}
        for key, row in result["pieces"][piece]["rows"].items():
            size = dict(zip(("B", "T", "V"), key))
            extra = {}
            if "skipped" in row:
                row = dict.fromkeys(columns, row["skipped"])
            else:
                extra = {"peak_extra_bytes": row["memory"], "max_rel_diff": row["max_rel_diff"]}
                if piece == LOGPROB:
                    extra["gradient_bytes"] = row["grad_bytes"]
            rows.append(common.json_row(KERNELS[piece], case_name(piece, key), size, row, [FASTPPO], peers, **extra))
    details = {"peer": result["trl"], "trl_log_prob_path": result["trl_path"], "transformers": result["transformers"],
               "others_cpu_share": result["others_cpu"], "temperature": TEMPERATURE, "beta": BETA, "gamma": GAMMA,
               "lam": LAM, "tolerance": TOLERANCE}
    return {"name": "rlhf", "title": "fastppo RLHF pieces vs TRL", "script": "benchmarks/bench_rlhf.py",
            "warnings": result["warnings"], "details": details, "rows": rows}


def main(argv=None):
    args = common.bench_parser(__doc__.splitlines()[0], "rlhf").parse_args(argv)
    result = collect(args)
    return common.write_reports(args, result, "rlhf", report(result), to_json(result))


if __name__ == "__main__":
    sys.exit(main())
