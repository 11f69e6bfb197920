"""The end-to-end benchmark runs (tiny mode) and its eager baseline computes what fastppo does."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

pytest.importorskip("envpool")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_eager_baseline_matches_the_kernels():
    sys.path.insert(0, str(ROOT))
    from benchmarks.cleanrl_eager import EAGER

    import fastppo

    g = torch.Generator().manual_seed(0)
    T, N = 37, 3
    rewards, values = torch.randn(T, N, generator=g, dtype=torch.float64), torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = torch.rand(T, N, generator=g) < 0.2
    terminated = dones & (torch.rand(T, N, generator=g) < 0.5)
    last = torch.randn(N, generator=g, dtype=torch.float64)
    for a, b in zip(EAGER.gae(rewards, values, dones, last, terminated=terminated, gamma=0.9, gae_lambda=0.8),
                    fastppo.gae(rewards, values, dones, last, terminated=terminated, gamma=0.9, gae_lambda=0.8)):
        torch.testing.assert_close(a, b)
    B = 50
    args = [torch.randn(B, generator=g, dtype=torch.float64) for _ in range(7)]
    mask = torch.rand(B, generator=g) < 0.8
    eager = EAGER.ppo_loss(*args, mask=mask, ent_coef=0.01)
    ours = fastppo.ppo_loss(*args, mask=mask, ent_coef=0.01)
    for a, b in zip(eager, ours):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-9)


def test_e2e_tiny_mode_runs_and_writes_its_report(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--tiny", "--out-dir", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    results = json.loads((tmp_path / "e2e_tiny.json").read_text())
    contenders = {(r["env_id"], r["contender"]) for r in results}
    assert {("CartPole-v1", "fastppo"), ("CartPole-v1", "fastppo-fast"), ("CartPole-v1", "eager"),
            ("CartPole-v1", "raw"), ("HalfCheetah-v5", "fastppo")} <= contenders
    by = {(r["env_id"], r["contender"]): r for r in results}
    assert by["CartPole-v1", "fastppo"]["backend"] == "fused" and by["CartPole-v1", "eager"]["backend"] == "torch"
    assert by["CartPole-v1", "fastppo"]["preset"] == "classic" and by["CartPole-v1", "fastppo-fast"]["preset"] == "classic-fast"
    for r in results:
        assert "skipped" in r or (r["sps"] > 0 and r["steps"] > 0)
    report = (tmp_path / "e2e_tiny.md").read_text()
    assert "| CartPole-v1 | fastppo (CleanRL's preset) |" in report and "SPS ratios" in report
    assert "| CartPole-v1 SPS vs raw EnvPool stepping, same env count |" in report
    assert (tmp_path / "learning_curves_tiny.png").stat().st_size > 0
