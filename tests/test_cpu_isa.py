"""The CPU loops are compiled once per instruction set (baseline x86-64, AVX2, AVX-512) and the
widest one the CPU supports runs; the kernel tests check that one against float64 references.
Here every narrower copy this CPU can run (chosen with FASTPPO_CPU_ISA) must agree with it, and so
must FASTPPO_CPU_ISA=scalar, which sends every element through the strided element functions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo import _C  # noqa: E402

ISAS = ["baseline", "avx2", "avx512"]

SCRIPT = r"""
import sys, torch, fastppo
from fastppo import _C
from fastppo.rlhf import kl_penalty_rewards, masked_whiten
torch.manual_seed(0)
out = {"isa": _C.build_info()["cpu_isa"]}
for dtype in (torch.float32, torch.float64):
    B, T = 7, 1031
    old = -(torch.randn(B, T, dtype=dtype).abs()) - 0.5
    new = (old + 0.3 * torch.randn(B, T, dtype=dtype)).requires_grad_()
    adv, ov = torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype)
    nv = (ov + 0.3 * torch.randn(B, T, dtype=dtype)).requires_grad_()
    ret, ent = ov + torch.randn(B, T, dtype=dtype), (torch.rand(B, T, dtype=dtype) + 0.5).requires_grad_()
    mask = torch.rand(B, T) < 0.8
    for m, dual in ((None, None), (mask, 3.0)):
        o = fastppo.ppo_loss(new, old, adv, nv, ov, ret, ent, mask=m, ent_coef=0.01, dual_clip=dual, agg="seq-mean-token-mean")
        grads = torch.autograd.grad(o.loss, [new, nv, ent])
        out[f"loss {dtype} {m is None}"] = [x.detach() for x in o] + list(grads)
    logits = torch.randn(513, 37, dtype=dtype, requires_grad=True)
    actions = torch.randint(0, 37, (513,))
    lp, en = fastppo.categorical_logprob_entropy(logits, actions, 0.7)
    out[f"categorical {dtype}"] = [lp.detach(), en.detach(), torch.autograd.grad(lp.sum() + en.sum(), logits)[0]]
    mean, log_std = torch.randn(513, 6, dtype=dtype, requires_grad=True), torch.randn(6, dtype=dtype, requires_grad=True)
    lp, en = fastppo.normal_logprob_entropy(mean, log_std, torch.randn(513, 6, dtype=dtype))
    out[f"normal {dtype}"] = [lp.detach(), en.detach(), *torch.autograd.grad(lp.sum() + en.sum(), [mean, log_std])]
    shaped = kl_penalty_rewards(new.detach(), old, mask, torch.randn(B, dtype=dtype), 0.1, "k3", 5.0)
    out[f"rlhf {dtype}"] = [*shaped, masked_whiten(adv, mask)]
    for T_, N_ in ((1031, 7), (4096, 1)):  # environments in parallel; one long rollout (the chunked scan)
        r, v = torch.randn(T_, N_, dtype=dtype), torch.randn(T_, N_, dtype=dtype)
        d = torch.rand(T_, N_) < 0.05
        out[f"gae {dtype} {T_}x{N_}"] = list(fastppo.gae(r, v, d, torch.randn(N_, dtype=dtype), terminated=d & (torch.rand(T_, N_) < 0.5)))
torch.save(out, sys.argv[1])
"""


def _run(tmp_path, isa):
    path = tmp_path / f"{isa or 'default'}.pt"
    env = {k: v for k, v in os.environ.items() if k != "FASTPPO_CPU_ISA"}
    if isa is not None:
        env["FASTPPO_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return torch.load(path, weights_only=False)


def test_build_info_names_the_cpu_isa():
    assert _C.build_info()["cpu_isa"] in ISAS
    assert f"CPU loops {_C.build_info()['cpu_isa']}" in fastppo.build_info()


def test_every_instruction_set_agrees_with_the_default(tmp_path):
    default = _run(tmp_path, None)
    widest = ISAS.index(default["isa"])
    # scalar: the baseline copy with every loop on its element-by-element path (no contiguous loops)
    for isa in ISAS[:widest] + ["scalar"]:
        got = _run(tmp_path, isa)
        assert got["isa"] == isa
        for key, expected in default.items():
            if key == "isa":
                continue
            for a, b in zip(got[key], expected):
                tol = 1e-12 if b.dtype == torch.float64 else 2e-5
                if b.dtype == torch.int64:
                    assert torch.equal(a, b), (isa, key)
                else:
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{isa} {key}: {m}")


def test_an_unknown_instruction_set_is_refused_by_name():
    env = dict(os.environ, FASTPPO_CPU_ISA="sse9")
    done = subprocess.run([sys.executable, "-c", "import fastppo"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FASTPPO_CPU_ISA must be baseline, avx2, avx512 or scalar" in done.stderr and "'sse9'" in done.stderr
