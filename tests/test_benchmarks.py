"""The benchmark suite runs end to end: ``python -m benchmarks --tiny`` measures every kernel against
its peers (smallest size, a few calls, no torch.compile) and writes its JSON, Markdown and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"gae", "ppo_loss", "categorical_logprob_entropy", "normal_logprob_entropy"}


def test_tiny_suite_writes_every_kernel_and_peer(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    document = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert document["mode"] == "tiny" and document["device"] == "cpu"
    machine = document["machine"]
    for key in ("date", "cpu", "logical_cores", "torch", "numpy", "fastppo", "fastppo_build_info", "device"):
        assert machine[key], key
    for bench in document["benchmarks"]:
        assert "failed" not in bench, bench
        assert bench["warnings"] == [], bench["warnings"]  # every peer's outputs matched fastppo's

    rows = document["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    for row in rows:
        assert row["fastppo_ms"] and all(ms > 0 for ms in row["fastppo_ms"].values()), row
        assert row["peers"], row
        for peer in row["peers"]:
            if "skipped" in peer:
                assert isinstance(peer["skipped"], str) and peer["skipped"], peer
            else:
                assert peer["median_ms"] > 0 and peer["speedup"] > 0, peer
                assert peer["vs"] in row["fastppo_ms"], peer
    # --tiny leaves torch.compile out, and says so.
    compiled = [p for row in rows for p in row["peers"] if "torch.compile" in p["name"]]
    assert compiled and all("--tiny" in p["skipped"] for p in compiled)

    summary = (tmp_path / "suite_cpu.md").read_text()
    for kernel in KERNELS:
        assert f"### fastppo.{kernel}" in summary
    for row in rows:
        assert f"| {row['case']} |" in summary
    assert (tmp_path / "speedups_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("gae", "loss", "heads"):  # each script's own report
        assert (tmp_path / f"{name}_cpu.md").exists()
