"""The linear-head benchmark runs end to end: ``python -m benchmarks.bench_linear --tiny`` measures each
contender in a fresh process (time and peak memory) and writes its Markdown, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the benchmarks measure against torch peers; a numpy-only install skips these tests

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_run_writes_report_json_and_plot(tmp_path):
    out, js = tmp_path / "linear_cpu.md", tmp_path / "linear_cpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_linear", "--tiny", "--threads", "1", "--out", str(out),
         "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert "## Machine" in report and "## Checks" in report and "## Notes" in report
    assert "WARNING" not in report, report
    for contender in ("fastppo.linear_logprob_entropy", "fastppo.linear_ppo_loss", "logits + fastppo head",
                      "eager log_softmax", "logits + fastppo head + ppo_loss"):
        assert f"| {contender} |" in report, contender
    assert (tmp_path / "linear_cpu.png").stat().st_size > 0

    document = json.loads(js.read_text())
    assert document["mode"] == "tiny" and document["device"] == "cpu"
    rows = document["rows"]
    assert {(row["kernel"], row["size"]["dtype"]) for row in rows} == {
        (k, d) for k in ("linear_logprob_entropy", "linear_ppo_loss") for d in ("float32", "bfloat16")}
    assert sorted(row["size"]["V"] for row in rows if row["kernel"] == "linear_logprob_entropy"
                  and row["size"]["dtype"] == "float32") == [257, 1031]
    for row in rows:
        assert row["fastppo_ms"], row
        for peer in row["peers"]:
            assert peer["median_ms"] > 0 and peer["speedup"] > 0, peer
        for column, peak in row["peak_extra_bytes"].items():
            assert isinstance(peak, int), (column, peak)  # measured in the contender's own process
