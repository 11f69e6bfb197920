"""The benchmark suite runs end to end: ``python -m benchmarks --tiny`` measures every kernel against
its peers (smallest size, a few calls, no torch.compile) and writes its JSON, Markdown and plot; and
the same cases under pytest-benchmark (``pytest benchmarks --benchmark-only``) give a JSON file from
which ``python -m benchmarks --from-json`` writes the same tables and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the benchmarks measure against torch peers; a numpy-only install skips these tests

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"gae", "ppo_loss", "categorical_logprob_entropy", "normal_logprob_entropy",
           "multi_categorical_logprob_entropy", "tanh_normal_logprob_entropy"}
RLHF_KERNELS = {"rlhf.kl_penalty_rewards", "rlhf.token_gae", "rlhf.masked_whiten"}
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def check_rows(rows):
    """Every row has fastppo's medians and, for each peer, a median and speed-up or a reason; the
    torch.compile peers are left out in tiny mode, and say so."""
    for row in rows:
        assert row["fastppo_ms"] and all(ms > 0 for ms in row["fastppo_ms"].values()), row
        assert row["peers"], row
        for peer in row["peers"]:
            if "skipped" in peer:
                assert isinstance(peer["skipped"], str) and peer["skipped"], peer
            else:
                assert peer["median_ms"] > 0 and peer["speedup"] > 0, peer
                assert peer["vs"] in row["fastppo_ms"], peer
    compiled = [p for row in rows for p in row["peers"] if "torch.compile" in p["name"]]
    assert compiled and all("--tiny" in p["skipped"] for p in compiled)


def test_tiny_suite_writes_every_kernel_and_peer(tmp_path):
    run("-m", "benchmarks", "--tiny", "--out-dir", str(tmp_path))

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
    check_rows(rows)
    summary = (tmp_path / "suite_cpu.md").read_text()
    for kernel in KERNELS:
        assert f"### fastppo.{kernel}" in summary
    for row in rows:
        assert f"| {row['case']} |" in summary
    assert (tmp_path / "speedups_cpu.png").read_bytes()[:8] == PNG
    for name in ("gae", "loss", "heads"):  # each script's own report
        assert (tmp_path / f"{name}_cpu.md").exists()


def test_pytest_benchmark_json_feeds_the_suite_tables(tmp_path):
    pytest_json = tmp_path / "pytest_benchmark.json"
    run("-m", "pytest", "benchmarks", "--benchmark-only", "--bench-sizes", "tiny", "--benchmark-min-rounds=1",
        "--benchmark-max-time=0.01", f"--benchmark-json={pytest_json}", "-q", "-p", "no:cacheprovider")
    report = json.loads(pytest_json.read_text())
    assert report["machine_info"]["fastppo"]["device"] == "cpu"
    assert all(b["extra_info"]["kernel"] and b["stats"]["median"] > 0 for b in report["benchmarks"])
    assert report["skipped"] and all(s["reason"] for s in report["skipped"])  # the torch.compile peers, at least

    out = tmp_path / "suite"
    run("-m", "benchmarks", "--from-json", str(pytest_json), "--out-dir", str(out))
    document = json.loads((out / "suite_cpu.json").read_text())
    assert document["mode"] == "pytest-benchmark" and document["device"] == "cpu"
    rows = document["rows"]
    assert {row["kernel"] for row in rows} == KERNELS | RLHF_KERNELS
    check_rows(rows)
    summary = (out / "suite_cpu.md").read_text()
    # heads and rlhf both time categorical_logprob_entropy: one table each
    for title in ("gae", "ppo_loss", "categorical_logprob_entropy (heads)", "categorical_logprob_entropy (rlhf)",
                  "normal_logprob_entropy", "multi_categorical_logprob_entropy", "tanh_normal_logprob_entropy",
                  *RLHF_KERNELS):
        assert f"### fastppo.{title}\n" in summary, title
    assert (out / "speedups_cpu.png").read_bytes()[:8] == PNG


def test_thread_runtime_tiny_run_keeps_one_row_per_label(tmp_path):
    from fastppo import _C

    for label, first in (("a", "torch"), ("b", "fastppo"), ("a", "torch")):
        run("-m", "benchmarks.thread_runtime", "--tiny", "--label", label, "--import-first", first,
            "--out-dir", str(tmp_path))
    runs = json.loads((tmp_path / "thread_runtime_cpu.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["b", "a"]  # measuring "a" again replaced its entry
    assert [r["import_first"] for r in runs] == ["fastppo", "torch"]
    steps, kernels = ("mlp", "op"), ("ppo_loss", "gae")
    expected = {f"{s} after {k}" for s in steps for k in kernels} | {f"{k} after {s}" for s in steps for k in kernels}
    for r in runs:
        assert r["tiny"] and r["rounds"] == 2
        assert r["thread_runtime"] == _C.build_info()["thread_runtime"]
        assert r["fastppo_threads"] >= 1 and r["torch_threads"] >= 1
        assert 0 < r["import_fastppo_ms"] < 60_000 and r["import_fastppo_pulls_torch"] is False
        assert set(r["alone_ms"]) == {*steps, *kernels} and all(ms > 0 for ms in r["alone_ms"].values())
        assert set(r["ratios"]) == expected
        for key, value in r["ratios"].items():
            assert value == r["after_ms"][key] / r["alone_ms"][key.split(" after ")[0]]
    report = (tmp_path / "thread_runtime_cpu.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| b (tiny) |") or line.startswith("| a (tiny) |")]
    assert len(rows) == 2 and all(row.count("|") == 5 + 8 + 1 for row in rows)
