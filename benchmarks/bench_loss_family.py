"""What each of ``fastppo.ppo_loss``'s LLM-family options costs against the token-mean loss it extends.

    python -m benchmarks.bench_loss_family            # writes benchmarks/results/loss_family_cpu.md (+ .json)
    python -m benchmarks.bench_loss_family --quick    # a smaller problem, prints only

The problem is a minibatch of language-model tokens, ``[R, T]`` float32 (R = 256 sequences of
T = 4096 tokens, 1,048,576 in all; ``--quick``: 64 x 1024), with a mask that selects 90% of the
tokens at random. Every case is one forward + backward call (``torch.autograd.grad`` of the loss
with respect to the differentiable inputs). The reference rows are the loss without any new option:
the policy term alone (the critic-free setting of GRPO / DAPO / GSPO) and the policy term with the
value and entropy terms (PPO with a critic). Each option row adds one option to the first reference,
the last row all of them, and its ratio is its time over that reference's.

Timing: the cases are called in rounds (each case once per round, in a shuffled order, after a warm-up call
of each), for about ``--seconds`` in all, and each case's time is the median of its calls, so a slow
moment of the machine falls on every case.

Memory: by default glibc is told to keep freed memory (``mallopt``: buffers up to 32 MiB from the heap,
no trimming), so each call reuses the pages the previous calls touched and the times are the loss's
own. With glibc's defaults (``--glibc-default-malloc``) a 4 MiB output buffer is sometimes mapped fresh
and faulted in page by page at its first write, depending on what the earlier calls freed: on a 2-core
VM that added up to 12 ms to a 2.3 ms call, in runs of calls of one case, so it moved whole medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

try:
    from benchmarks import _common as common  # python -m benchmarks.bench_loss_family
except ImportError:
    import _common as common  # python benchmarks/bench_loss_family.py

RESULTS = Path(__file__).resolve().parent / "results"
BASE = "token-mean, policy term"
BASE_VALUE = "token-mean, policy + value + entropy"


def make_inputs(torch, R, T, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(R, T, generator=g)

    old = -randn().abs() - 0.5
    return dict(
        new=(old + 0.2 * randn()).requires_grad_(True),
        old=old,
        adv=randn(),
        old_value=(ov := randn()),
        new_value=(ov + 0.3 * randn()).requires_grad_(True),
        returns=ov + randn(),
        entropy=(torch.rand(R, T, generator=g) + 0.5).requires_grad_(True),
        ref=old + 0.1 * randn(),
        is_weights=2.0 * torch.rand(R, T, generator=g),
        mask=torch.rand(R, T, generator=g) < 0.9,
    )


def cases(x):
    """name -> (reference case, ppo_loss keyword arguments, differentiable inputs)."""
    policy = dict(mask=x["mask"])
    critic = dict(policy, new_value=x["new_value"], old_value=x["old_value"], returns=x["returns"],
                  entropy=x["entropy"], ent_coef=0.01)
    kl = dict(ref_logprob=x["ref"], kl_coef=0.04)
    leaves, leaves_critic = [x["new"]], [x["new"], x["new_value"], x["entropy"]]
    return {
        BASE: (None, policy, leaves),
        "clip_coef_high=0.28": (BASE, dict(policy, clip_coef_high=0.28), leaves),
        "dual_clip=3": (BASE, dict(policy, dual_clip=3.0), leaves),
        "is_weights": (BASE, dict(policy, is_weights=x["is_weights"]), leaves),
        'agg="seq-mean-token-mean"': (BASE, dict(policy, agg="seq-mean-token-mean"), leaves),
        'agg="seq-mean-token-sum-norm"': (BASE, dict(policy, agg="seq-mean-token-sum-norm"), leaves),
        'ratio_level="sequence"': (BASE, dict(policy, ratio_level="sequence"), leaves),
        "KL term k1": (BASE, dict(policy, kl_estimator="k1", **kl), leaves),
        "KL term k2": (BASE, dict(policy, kl_estimator="k2", **kl), leaves),
        "KL term k3": (BASE, dict(policy, kl_estimator="k3", **kl), leaves),
        "all: clip-higher, is_weights, KL k3": (
            BASE, dict(policy, clip_coef_high=0.28, is_weights=x["is_weights"], kl_estimator="k3", **kl), leaves),
        BASE_VALUE: (None, critic, leaves_critic),
        "with value + entropy: all of the above": (
            BASE_VALUE, dict(critic, clip_coef_high=0.28, is_weights=x["is_weights"], kl_estimator="k3", **kl),
            leaves_critic),
    }


def keep_freed_memory() -> bool:
    """glibc's ``mallopt``: serve buffers up to 32 MiB (its largest mmap threshold) from the heap and never
    trim the heap, so freed buffers are reused warm; False where it is not glibc or refuses."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 1024 tokens, 3 s; prints only")
    parser.add_argument("--seconds", type=float, default=None, help="time budget for all rounds (default 40, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (default: results/loss_family_cpu.md)")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (freed buffers may be unmapped and faulted in again)")
    args = parser.parse_args(argv)
    kept = False if args.glibc_default_malloc else keep_freed_memory()

    import torch

    import fastppo

    R, T = (64, 1024) if args.quick else (256, 4096)
    seconds = args.seconds or (3.0 if args.quick else 40.0)
    x = make_inputs(torch, R, T)
    table = cases(x)

    def call(kwargs, leaves):
        out = fastppo.ppo_loss(x["new"], x["old"], x["adv"], **kwargs)
        torch.autograd.grad(out.loss, leaves)

    for _, kwargs, leaves in table.values():  # warm-up (and every case runs)
        call(kwargs, leaves)
    times = {name: [] for name in table}
    end = time.perf_counter() + seconds
    rounds = 0
    order = random.Random(0)
    names = list(table)
    while rounds < 5 or time.perf_counter() < end:
        order.shuffle(names)  # no case always follows the same one
        for name in names:
            _, kwargs, leaves = table[name]
            t0 = time.perf_counter()
            call(kwargs, leaves)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    median_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    lines = ["| case | median ms | / its reference | calls over 3x the median |", "|---|---:|---:|---:|"]
    rows = []
    for name, (ref, _, _) in table.items():
        ratio = median_ms[name] / median_ms[ref] if ref else 1.0
        slow = sum(t * 1e3 > 3 * median_ms[name] for t in times[name])
        rows.append(dict(case=name, reference=ref or name, median_ms=median_ms[name], ratio=ratio, calls=len(times[name]),
                         slow_calls=slow))
        label = f"**{name}**" if ref is None else name
        lines.append(f"| {label} | {median_ms[name]:.3f} | {ratio:.3f} | {slow} |")
    machine = common.machine_info("cpu")
    text = "\n".join([
        "# fastppo.ppo_loss: the cost of each loss-family option (CPU)",
        "",
        "## Machine",
        "",
        *common.machine_head(machine),
        "",
        f"## Forward + backward, [{R}, {T}] float32 tokens, 90% selected by the mask",
        "",
        f"{rounds} rounds of every case in turn (shuffled order); each time is the median of its {rounds} calls. Bold: the two "
        "references; every other row's ratio divides by the reference above it.",
        "",
        *lines,
        "",
        "## Notes",
        "",
        "- Generated by `python -m benchmarks.bench_loss_family` (see its docstring for the inputs).",
        "- The KL rows take `ref_logprob` with `kl_coef=0.04` (a differentiable term); `is_weights` in "
        "[0, 2); every row keeps `norm_adv=True` and the mask.",
        ("- Allocator: glibc keeps freed memory (`mallopt`: buffers up to 32 MiB from the heap, no trim), so "
         "every call reuses warm pages; with glibc's defaults (`--glibc-default-malloc`) a fresh 4 MiB output "
         "buffer is sometimes mapped and faulted in page by page, which depends on what earlier calls freed, "
         "not on the option, and can move whole medians." if kept else
         "- Allocator: glibc's defaults (`--glibc-default-malloc`): a freed 4 MiB buffer may be unmapped and "
         "the next call's output faulted in page by page, which depends on what earlier calls freed, not on "
         "the option; calls over 3x the median are those."),
        "",
    ])
    print(text)
    if not args.quick or args.out:
        out = args.out or RESULTS / "loss_family_cpu.md"
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(dict(machine=machine, R=R, T=T, rounds=rounds, rows=rows,
                                                            freed_memory_kept=kept,
                                                            raw_ms={k: [t * 1e3 for t in v] for k, v in times.items()}),
                                                       indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
