"""The speed gate: every public kernel and the fused actor-critic update timed against its peer in
the same process, each ratio (peer time / fastppo time) checked against a floor.

    python -m benchmarks.guard              # the table; exit status 1 when a ratio is below its floor
    python -m benchmarks.guard --update     # measure, then record the ratios and floors (1/3 of them)
    python -m benchmarks.guard --json FILE  # also keep the raw timings

The peers are what users run instead (tests/peers.py and bench_rlhf.py's TRL lines): CleanRL's
GAE loop and loss lines in eager torch, the numpy GAE loop, torch.distributions' heads, TRL's PPO
pieces, and the torch training step the fused update replaces. A ratio, unlike a time, travels
between machines and survives a busy one, since both sides of it slow down together. Floors are
about a third of the ratio recorded on an idle machine (benchmarks/guard_floors.json, written by
``--update``), low enough that noise never trips them and high enough that a kernel which lost its
vector loops (FASTPPO_CPU_ISA=scalar shows one: tests/test_guard.py) or gained a pass does.

Each case alternates peer and fastppo calls in rounds and takes each side's median; the whole run
takes about 40 s. One thread, CPU only: the CUDA kernels and the threaded loops are measured by the
benchmark suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

try:
    from benchmarks import _common as common  # python -m benchmarks.guard
except ImportError:
    import _common as common  # python benchmarks/guard.py

FLOORS_FILE = Path(__file__).resolve().parent / "guard_floors.json"
FLOOR_SHARE = 1 / 3  # a floor is this share of the ratio recorded on an idle machine
CASE_BUDGET_S = 1.6  # per case, both contenders together (at least MIN_ROUNDS rounds)
MIN_ROUNDS = 5

torch = None
np = None
fastppo = None


def rounds_median(peer, fast, budget_s=CASE_BUDGET_S, min_rounds=MIN_ROUNDS):
    """Medians of ``peer()`` and ``fast()`` in seconds, timed in alternating rounds after a warm-up call
    of each, so that a slow moment of the machine falls on both."""
    peer()
    fast()
    peer_s, fast_s = [], []
    end = time.perf_counter() + budget_s
    while len(peer_s) < min_rounds or time.perf_counter() < end:
        for fn, times in ((peer, peer_s), (fast, fast_s)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(peer_s), statistics.median(fast_s)


# --- The cases: name -> (peer's name, a function building (peer, fast)) ----------------------------


def gae_numpy(T, N):
    rng = np.random.default_rng(0)
    r, v = rng.standard_normal((T, N), np.float32), rng.standard_normal((T, N), np.float32)
    d = rng.random((T, N)) < 0.01
    last = np.zeros(N, np.float32)
    starts = np.concatenate([np.ones((1, N), bool), d[:-1]]).astype(np.float32)  # SB3: episode starts

    def peer():
        peers.sb3_gae(r, v, starts, last, d[-1].astype(np.float32))

    def fast():
        fastppo.gae(r, v, d, last)

    return peer, fast


def gae_torch(T, N):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    d = torch.rand(T, N, generator=g) < 0.01
    last = torch.zeros(N)

    def peer():
        peers.cleanrl_gae_as_fastppo(r, v, d, last)

    def fast():
        fastppo.gae(r, v, d, last)

    return peer, fast


def loss(B, masked=False):
    g = torch.Generator().manual_seed(B)
    new = (0.1 * torch.randn(B, generator=g)).requires_grad_()
    old = new.detach() + 0.05 * torch.randn(B, generator=g)
    adv, ret = torch.randn(B, generator=g), torch.randn(B, generator=g)
    new_value, old_value = torch.randn(B, generator=g).requires_grad_(), torch.randn(B, generator=g)
    entropy = torch.rand(B, generator=g).requires_grad_()
    mask = torch.rand(B, generator=g) < 0.8 if masked else None
    leaves = (new, new_value, entropy)

    def peer():
        out = peers.cleanrl_loss(new, old, adv, new_value, old_value, ret, entropy, mask=mask, ent_coef=0.01)
        torch.autograd.grad(out.loss, leaves)

    def fast():
        out = fastppo.ppo_loss(new, old, adv, new_value, old_value, ret, entropy, mask=mask, ent_coef=0.01)
        torch.autograd.grad(out.loss, leaves)

    return peer, fast


def categorical(R, A):
    g = torch.Generator().manual_seed(R)
    logits = torch.randn(R, A, generator=g).requires_grad_()
    actions = torch.randint(0, A, (R,), generator=g)

    def peer():
        logprob, entropy = peers.torch_categorical(logits, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    def fast():
        logprob, entropy = fastppo.categorical_logprob_entropy(logits, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    return peer, fast


def categorical_sample(R, A):
    logits = torch.randn(R, A, generator=torch.Generator().manual_seed(R))

    def peer():
        torch.distributions.Categorical(logits=logits).sample()

    def fast():
        fastppo.categorical_sample(logits)

    return peer, fast


def normal(R, D):
    g = torch.Generator().manual_seed(R)
    mean = torch.randn(R, D, generator=g).requires_grad_()
    log_std = torch.zeros(D).requires_grad_()
    actions = torch.randn(R, D, generator=g)

    def peer():
        logprob, entropy = peers.torch_normal(mean, log_std, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), (mean, log_std))

    def fast():
        logprob, entropy = fastppo.normal_logprob_entropy(mean, log_std, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), (mean, log_std))

    return peer, fast


def masked_categorical(R, A):
    g = torch.Generator().manual_seed(R + A)
    logits = torch.randn(R, A, generator=g).requires_grad_()
    mask = torch.rand(R, A, generator=g) < 0.7
    mask[:, 0] = True
    scores = torch.where(mask, torch.rand(R, A, generator=g), torch.tensor(-1.0))
    actions = scores.argmax(-1)  # a legal action per row

    def peer():
        logprob, entropy = peers.maskable_categorical(logits, actions, mask)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    def fast():
        logprob, entropy = fastppo.categorical_logprob_entropy(logits, actions, mask=mask)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    return peer, fast


def multi_categorical(R, nvec):
    g = torch.Generator().manual_seed(R)
    logits = torch.randn(R, sum(nvec), generator=g).requires_grad_()
    actions = torch.stack([torch.randint(0, n, (R,), generator=g) for n in nvec], -1)

    def peer():
        logprob, entropy = peers.torch_multi_categorical(logits, actions, nvec)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    def fast():
        logprob, entropy = fastppo.multi_categorical_logprob_entropy(logits, actions, nvec)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), logits)

    return peer, fast


def multi_categorical_sample(R, nvec):
    logits = torch.randn(R, sum(nvec), generator=torch.Generator().manual_seed(R))

    def peer():
        torch.stack([torch.distributions.Categorical(logits=part).sample()
                     for part in torch.split(logits, list(nvec), dim=-1)], -1)

    def fast():
        fastppo.multi_categorical_sample(logits, nvec)

    return peer, fast


def tanh_normal(R, D):
    g = torch.Generator().manual_seed(R + D)
    mean = torch.randn(R, D, generator=g).requires_grad_()
    log_std = torch.zeros(D).requires_grad_()
    actions = torch.tanh(torch.randn(R, D, generator=g))

    def peer():
        logprob, entropy = peers.torch_tanh_normal(mean, log_std, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), (mean, log_std))

    def fast():
        logprob, entropy = fastppo.tanh_normal_logprob_entropy(mean, log_std, actions)
        torch.autograd.grad(logprob.sum() + 0.01 * entropy.sum(), (mean, log_std))

    return peer, fast


def rlhf_inputs(B, T):
    g = torch.Generator().manual_seed(B * T)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logprob, ref = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    return g, mask, logprob, ref, torch.randn(B, generator=g), lengths - 1


def kl_rewards(B, T):
    _, mask, logprob, ref, scores, last = rlhf_inputs(B, T)

    def peer():
        rlhf_peers.trl_reward_shaping(logprob, ref, ~mask, last, scores, 0.05)

    def fast():
        rlhf.kl_penalty_rewards(logprob, ref, mask, scores, beta=0.05)

    return peer, fast


def token_gae(B, T):
    g, mask, rewards, values, _, last = rlhf_inputs(B, T)

    def peer():
        rlhf_peers.trl_token_gae(rewards, values, ~mask, 1.0, 0.95)

    def fast():
        rlhf.token_gae(rewards, values, last, gamma=1.0, gae_lambda=0.95)

    return peer, fast


def whiten(B, T):
    _, mask, x, _, _, _ = rlhf_inputs(B, T)

    def peer():
        rlhf_peers.trl_masked_whiten(x, mask)

    def fast():
        rlhf.masked_whiten(x, mask)

    return peer, fast


def fused_update(B, M):
    """One minibatch update of CleanRL's CartPole agent: the torch step (agent forward, fastppo's head
    and loss, backward, grad clip, Adam) against FusedActorCritic's one call."""
    from fastppo.policy import FusedActorCritic
    from fastppo.train import Agent

    class Actions:  # CartPole's action space, as far as Agent reads it
        n, shape = 2, ()

    g = torch.Generator().manual_seed(B)
    obs, act = torch.randn(B, 4, generator=g), torch.randint(0, 2, (B,), generator=g)
    logp, adv = -0.7 + 0.1 * torch.randn(B, generator=g), torch.randn(B, generator=g)
    ret, val = torch.randn(B, generator=g), torch.randn(B, generator=g)
    real = torch.ones(B, dtype=torch.bool)
    torch.manual_seed(0)
    agent = Agent((4,), Actions(), "classic")
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    fused = FusedActorCritic(Agent((4,), Actions(), "classic"), lr=2.5e-4, eps=1e-5, max_grad_norm=0.5,
                             clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, clip_vloss=True, norm_adv=True)
    fused.set_batch(obs, act, logp, adv, ret, val, real)
    idx = torch.randperm(B, generator=g)[:M].contiguous()

    def peer():
        _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs[idx], act[idx])
        out = fastppo.ppo_loss(newlogprob, logp[idx], adv[idx], newvalue, val[idx], ret[idx], entropy, ent_coef=0.01)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
        optimizer.step()

    def fast():
        fused.update(idx)

    return peer, fast


CASES = {
    "gae numpy 2048x8": ("SB3's numpy loop", lambda: gae_numpy(2048, 8)),
    "gae torch 128x8": ("CleanRL's loop", lambda: gae_torch(128, 8)),
    "gae torch 1024x4096": ("CleanRL's loop", lambda: gae_torch(1024, 4096)),
    "ppo_loss fwd+bwd 4096": ("CleanRL's eager lines", lambda: loss(4096)),
    "ppo_loss fwd+bwd 1048576": ("CleanRL's eager lines", lambda: loss(1 << 20)),
    "ppo_loss fwd+bwd 1048576 masked": ("CleanRL's lines on the selection", lambda: loss(1 << 20, masked=True)),
    "categorical fwd+bwd 4096x6": ("torch.distributions", lambda: categorical(4096, 6)),
    "categorical fwd+bwd 256x32000": ("torch.distributions", lambda: categorical(256, 32000)),
    "categorical_sample 4096x18": ("torch.distributions", lambda: categorical_sample(4096, 18)),
    "normal fwd+bwd 4096x6": ("torch.distributions", lambda: normal(4096, 6)),
    "masked categorical fwd+bwd 4096x18": ("MaskableCategorical's lines", lambda: masked_categorical(4096, 18)),
    "multi-discrete fwd+bwd 4096x[3,3,3,3]": ("a Categorical per component", lambda: multi_categorical(4096, [3, 3, 3, 3])),
    "multi-discrete sample 4096x[3,3,3,3]": ("a Categorical per component", lambda: multi_categorical_sample(4096, [3, 3, 3, 3])),
    "tanh normal fwd+bwd 4096x6": ("TransformedDistribution(Normal, Tanh)", lambda: tanh_normal(4096, 6)),
    "kl_penalty_rewards 256x1024": ("TRL's lines", lambda: kl_rewards(256, 1024)),
    "token_gae 256x1024": ("TRL's loop", lambda: token_gae(256, 1024)),
    "masked_whiten 256x1024": ("TRL's masked_whiten", lambda: whiten(256, 1024)),
    "fused update 512/128": ("the torch step", lambda: fused_update(512, 128)),
}

peers = None
rlhf = None
rlhf_peers = None


def import_libraries():
    global torch, np, fastppo, peers, rlhf, rlhf_peers
    # One thread on both sides: a ratio of single-core speeds is what a lost vector loop changes, and
    # it does not swing with how busy the other cores are (OpenMP's barriers do).
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np
    import torch

    import fastppo
    import fastppo.rlhf as rlhf

    peers = common.import_peers()
    from benchmarks import bench_rlhf as rlhf_peers

    rlhf_peers.import_libraries()
    torch.set_num_threads(1)


def measure(names):
    rows = []
    for name in names:
        peer_name, build = CASES[name]
        peer_s, fast_s = rounds_median(*build())
        rows.append(dict(case=name, peer=peer_name, peer_us=peer_s * 1e6, fastppo_us=fast_s * 1e6,
                         ratio=peer_s / fast_s))
    return rows


def read_floors():
    if not FLOORS_FILE.exists():
        return {}
    return json.loads(FLOORS_FILE.read_text())["cases"]


def check(rows, floors):
    """Marks each row ok / BELOW / NO FLOOR; returns the rows that fail."""
    failed = []
    for row in rows:
        floor = floors.get(row["case"], {}).get("floor")
        row["floor"] = floor
        row["status"] = "NO FLOOR" if floor is None else ("ok" if row["ratio"] >= floor else "BELOW")
        if row["status"] != "ok":
            failed.append(row)
    return failed


def table(rows):
    lines = ["| case | peer | peer (us) | fastppo (us) | ratio | floor | |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        floor = "-" if r.get("floor") is None else f"{r['floor']:.2f}x"
        lines.append(f"| {r['case']} | {r['peer']} | {r['peer_us']:,.1f} | {r['fastppo_us']:,.1f} | "
                     f"{r['ratio']:.2f}x | {floor} | {r.get('status', '')} |")
    return "\n".join(lines)


def write_floors(rows):
    cases = {r["case"]: dict(peer=r["peer"], ratio=round(r["ratio"], 3), floor=round(r["ratio"] * FLOOR_SHARE, 3))
             for r in rows}
    FLOORS_FILE.write_text(json.dumps(dict(
        note="Ratios (peer time / fastppo time) recorded by `python -m benchmarks.guard --update` on an idle "
             f"machine; each floor is {FLOOR_SHARE:.3g} of its ratio.",
        recorded=datetime.date.today().isoformat(), machine=machine(), build=fastppo.build_info(),
        cases=cases), indent=2) + "\n")


def machine():
    return f"{common.cpu_model()}, {common.usable_cores()} usable cores"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="record the measured ratios and their floors")
    parser.add_argument("--json", help="write the rows (raw medians, ratios, floors) to this file")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    args = parser.parse_args(argv)
    import_libraries()
    start = time.perf_counter()
    rows = measure(args.case or list(CASES))
    if args.update:
        write_floors(rows)
    failed = check(rows, read_floors())
    print(f"fastppo speed gate ({fastppo.build_info()}; {time.perf_counter() - start:.0f} s):")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    for row in failed:
        reason = ("no floor recorded (python -m benchmarks.guard --update)" if row["floor"] is None
                  else f"{row['ratio']:.2f}x its peer, below the floor of {row['floor']:.2f}x")
        print(f"FAIL {row['case']}: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
