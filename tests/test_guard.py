"""The speed gate (benchmarks/guard.py): it covers every public kernel, has a floor for each case, and
fails on a kernel that lost its vector loops. The gate's own run (every case, against the floors) is
a step of .ci/run; these tests check that it can fail, not the machine's speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import guard  # noqa: E402

pytest.importorskip("torch")


def test_every_case_has_a_recorded_floor_below_its_ratio():
    floors = json.loads(guard.FLOORS_FILE.read_text())["cases"]
    assert set(floors) == set(guard.CASES)
    for name, entry in floors.items():
        assert 0 < entry["floor"] < entry["ratio"], name
        assert entry["peer"] == guard.CASES[name][0], name


def test_every_public_kernel_is_gated():
    import fastppo
    import fastppo.rlhf

    kernels = {"gae", "ppo_loss", "categorical_logprob_entropy", "categorical_sample", "normal_logprob_entropy",
               "multi_categorical_logprob_entropy", "multi_categorical_sample", "tanh_normal_logprob_entropy",
               "kl_penalty_rewards", "token_gae", "masked_whiten", "FusedActorCritic"}
    # Compositions of torch's GEMMs with the gated head and loss: benchmarks/bench_linear.py times them.
    composed = {"linear_logprob_entropy", "linear_ppo_loss"}
    public = {n for n in fastppo.__all__ if callable(getattr(fastppo, n)) and n[0].islower()}
    assert public - {"build_info", "cuda_available"} - composed <= kernels
    source = (ROOT / "benchmarks" / "guard.py").read_text()
    for name in kernels:
        assert f".{name}(" in source or f"{name}(" in source, name


def rows(*ratios_and_floors):
    return [dict(case=f"c{i}", peer="p", peer_us=r, fastppo_us=1.0, ratio=r) for i, (r, _) in enumerate(ratios_and_floors)]


def test_check_fails_a_ratio_below_its_floor_and_a_case_without_one():
    measured = rows((10.0, 3.0), (2.9, 3.0), (5.0, None))
    floors = {"c0": {"floor": 3.0}, "c1": {"floor": 3.0}}
    failed = guard.check(measured, floors)
    assert [r["case"] for r in failed] == ["c1", "c2"]
    assert [r["status"] for r in measured] == ["ok", "BELOW", "NO FLOOR"]
    assert "| c1 | p |" in guard.table(measured) and "BELOW" in guard.table(measured)


def run_gate(case, **env):
    environ = {k: v for k, v in os.environ.items() if k != "FASTPPO_CPU_ISA"}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "benchmarks.guard", "--case", case], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


def test_the_gate_fails_on_a_loss_kernel_without_its_vector_loops():
    # FASTPPO_CPU_ISA=scalar sends every element through the strided element functions (scalar
    # exp, no SIMD): the slowdown 1788d2a's lost if-conversion caused, made on purpose.
    case = "ppo_loss fwd+bwd 1048576"
    slowed = run_gate(case, FASTPPO_CPU_ISA="scalar")
    assert slowed.returncode == 1, slowed.stdout + slowed.stderr
    assert f"FAIL {case}" in slowed.stderr and "below the floor" in slowed.stderr
    assert "CPU loops scalar" in slowed.stdout
