"""The RLHF benchmark runs end to end: ``python -m benchmarks.bench_rlhf --tiny`` measures fastppo's
four RLHF pieces against TRL's (smallest sizes, 3 calls) and writes its Markdown and JSON; and the
TRL formulas it writes out itself (its peers where TRL is missing) agree with fastppo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"categorical_logprob_entropy", "rlhf.kl_penalty_rewards", "rlhf.token_gae", "rlhf.masked_whiten"}
TITLES = [
    "### 1. Per-token log-prob and entropy",
    "### 2. Reward shaping",
    "### 3. GAE over response tokens",
    "### 4. Whitening",
]


def test_tiny_run_writes_every_piece(tmp_path):
    out, js = tmp_path / "rlhf_cpu.md", tmp_path / "rlhf_cpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_rlhf", "--tiny", "--out", str(out), "--json", str(js)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = out.read_text()
    assert "## Machine" in report and "## Checks" in report and "## Notes" in report
    for title in TITLES:  # a time table and a memory table for each piece
        assert report.count(title) == 2, title
    assert report.count("| 1 | 64 | 32000 | 64 |") == 2  # piece 1's tiny case (B, T, V, tokens)
    assert report.count("| 64 | 512 |") == 6  # pieces 2-4's tiny case (B, T), in both tables
    assert "WARNING" not in report, report

    document = json.loads(js.read_text())
    assert document["mode"] == "tiny" and document["device"] == "cpu"
    (bench,) = document["benchmarks"]
    assert bench["name"] == "rlhf" and bench["warnings"] == []
    rows = document["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    for row in rows:
        assert row["fastppo_ms"]["fastppo"] > 0, row
        assert row["peers"], row
        for peer in row["peers"]:
            if "skipped" in peer:
                assert isinstance(peer["skipped"], str) and peer["skipped"], peer
            else:
                assert peer["median_ms"] > 0 and peer["speedup"] > 0, peer
                assert row["peak_extra_bytes"][peer["name"]] > 0, row


def test_reimplemented_trl_formulas_match_fastppo():
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_rlhf as bench
    from benchmarks._common import compare

    bench.import_libraries()
    no_trl = {}  # as if TRL were not installed: every peer is the script's own formula
    contenders = bench.logprob_case(bench.logprob_inputs(2, 9, 50, "cpu", seed=0), no_trl)
    assert list(contenders.calls) == [bench.FASTPPO, bench.REIMPL, bench.TRL_SLSE]
    assert isinstance(contenders.calls[bench.TRL_SLSE], str)
    warnings, diffs = contenders.check("logprob")
    assert warnings == [] and set(diffs[bench.REIMPL]) == {"logprob", "entropy", "grad logits"}

    for piece in (bench.SHAPING, bench.GAE, bench.WHITEN):
        contenders = bench.token_contenders(piece, bench.token_inputs(5, 23, "cpu", seed=1), no_trl)
        assert list(contenders.calls) == [bench.FASTPPO, bench.REIMPL]
        warnings, diffs = contenders.check(piece)
        assert warnings == [] and diffs[bench.REIMPL], piece

    # A mismatch is reported, not swallowed.
    t = torch.ones(3)
    warnings, _ = compare({"rewards": t + 1e-2}, {"rewards": t}, bench.REIMPL, bench.FASTPPO, "perturbed",
                          bench.TOLERANCE)
    assert len(warnings) == 1 and "rewards" in warnings[0]
