"""Crash safety. ``fastppo train`` and ``fastppo rlhf`` killed with SIGKILL at random moments
(before the first checkpoint, mid-run, while a checkpoint is being written) and resumed each time
finish; every checkpoint a kill leaves behind reads back, and the metrics log holds each iteration
exactly once. fastppo rlhf's checkpoints that cannot be continued (damaged, from fastppo train, made
with other settings, a full disk) are each a clear error that changes nothing (fastppo train's are in
test_train.py)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

import fastppo
from fastppo.checkpoint import checkpoint_kind, load_checkpoint, read_checkpoint

pytest.importorskip("envpool")

# The subprocesses import the same fastppo as this test (an installed one or the source tree), and
# run on one thread: on a small busy machine several threads each can take many times as long.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [str(Path(fastppo.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
FASTPPO = [sys.executable, "-m", "fastppo"]


class Killer:
    """Starts commands and SIGKILLs each when a condition holds (or lets it finish)."""

    def __init__(self, cwd: Path):
        self.cwd, self.launches = cwd, 0

    def run(self, cmd: list, kill_when: Optional[Callable[[], bool]] = None,
            timeout: float = 120.0) -> Optional[subprocess.CompletedProcess]:
        """Runs ``cmd``; with ``kill_when`` (polled as fast as it returns) kills it as soon as that is
        true. Returns the finished process (its output in ``stdout``), or None if it was killed."""
        self.launches += 1
        out = self.cwd / f"launch{self.launches}.log"
        with open(out, "w") as log:
            proc = subprocess.Popen(cmd, env=ENV, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"{cmd} ran past {timeout}s: {out.read_text()[-2000:]}"
            if kill_when is None:
                time.sleep(0.05)
            elif kill_when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), "")


def log_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def stamp(path: Path):
    """What tells a file written anew from the one there before (a killed write leaves its temporary file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def being_written(tmp_files: list, before: dict) -> bool:
    """A checkpoint's temporary file is there and is not the one a previous kill left."""
    return any(stamp(t) not in (None, before[t]) for t in tmp_files)


def kill_plan(rng: random.Random, kills: int) -> list:
    """The kills, in order: the first launch is killed early (``"setup"``); then, in a random order,
    two as soon as a checkpoint's temporary file appears after 1-4 more logged iterations
    (``"write"``; the kill lands before the rename) and the others 0-10 ms after 1-6 more logged
    iterations (``"log"``)."""
    rest = [("write", rng.randint(1, 4)) for _ in range(2)] + [("log", rng.randint(1, 6)) for _ in range(kills - 3)]
    rng.shuffle(rest)
    return [("setup", None)] + rest


def kill_condition(kind: str, more: Optional[int], log: Path, tmp_files: list, before: dict, started: Path,
                   setup_delay: float, rng: random.Random) -> Callable[[], bool]:
    """The ``kill_when`` of one planned kill (see ``kill_plan``): ``"setup"`` kills ``setup_delay``
    times a random fraction after ``started`` appears; ``before``: the temporary files' stamps at
    the start."""
    delay = rng.uniform(0, setup_delay if kind == "setup" else 0.01)
    target, reached = log_lines(log) + (more or 0), []

    def when() -> bool:
        if not reached:
            if not (started.exists() if kind == "setup" else log_lines(log) >= target):
                time.sleep(0.001)
                return False
            reached.append(time.monotonic())
        if kind == "write":
            return being_written(tmp_files, before)  # polled without sleeping: the window is short
        return time.monotonic() >= reached[0] + delay

    return when


def check_log(path: Path, last: int) -> list:
    """The metrics log: every line a record, iterations 1..last each once, in order."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, last + 1))
    return records


def test_train_killed_at_random_moments_resumes_to_the_end(tmp_path):
    rng = random.Random(20240607)
    steps, batch = 30_720, 8 * 32  # classic-fast on CartPole: 8 envs x 32 steps, 120 iterations, ~2 s of training
    iterations = steps // batch
    run_dir = tmp_path / "run"
    fresh = FASTPPO + ["train", "--env-id", "CartPole-v1", "--preset", "classic-fast", "--total-timesteps", str(steps),
                       "--checkpoint-every", "1", "--seed", "3", "--device", "cpu", "--run-dir", str(tmp_path),
                       "--run-name", "run", "--log-every", "1000"]
    resume = FASTPPO + ["train", "--resume", str(run_dir)]
    log, ckpt, tmp = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt", run_dir / "checkpoint.tmp"
    killer = Killer(tmp_path)
    saved, resume_points, mid_write, finished = 0, {1}, 0, None
    for kind, more in kill_plan(rng, kills=5):
        # Killed before it wrote config.json, a run is started anew; after, --resume continues it (from
        # its config.json alone when no checkpoint was written yet).
        cmd = resume if (run_dir / "config.json").exists() else fresh
        before = {tmp: stamp(tmp)}
        finished = killer.run(cmd, kill_condition(kind, more, log, [tmp], before, run_dir / "config.json", 0.02, rng))
        if finished is not None:
            break
        mid_write += kind == "write" and being_written([tmp], before)  # the kill landed before the rename
        if ckpt.exists():  # never unreadable or partial: a kill leaves the last complete checkpoint
            state = load_checkpoint(ckpt)
            assert saved <= state["iteration"] < iterations
            saved = state["iteration"]
            assert log_lines(log) >= saved  # an iteration is logged before its checkpoint
        resume_points.add(saved + 1)
    assert finished is None and mid_write >= 1, (killer.launches, mid_write)
    finished = killer.run(resume)
    assert finished.returncode == 0, finished.stdout[-3000:]
    records = check_log(log, iterations)
    assert {r["first_iteration"] for r in records} <= resume_points
    assert records[-1]["first_iteration"] == saved + 1  # the last launch continued from the last checkpoint
    assert load_checkpoint(ckpt)["iteration"] == iterations and not tmp.exists()
    summary = json.loads(finished.stdout.splitlines()[-1])
    assert summary["global_step"] == iterations * batch
    # The mean return of the recent episodes: 134-256 over seeds 1-6 at this budget, with or without
    # resumes; a policy that does not learn stays near 22.
    assert summary["episodic_return"] >= 80, summary


def test_rlhf_killed_at_random_moments_ends_as_the_uninterrupted_run(tmp_path):
    rng = random.Random(1789)
    iterations = 12
    tiny = ["--iterations", str(iterations), "--checkpoint-every", "1", "--sft-steps", "20", "--rm-pairs", "128",
            "--rm-heldout-pairs", "64", "--rm-epochs", "1", "--batch-size", "8", "--threads", "1",
            "--no-compare-kl-off", "--no-plot"]
    killer = Killer(tmp_path)
    whole = killer.run(FASTPPO + ["rlhf", "--run-dir", str(tmp_path / "whole")] + tiny)
    assert whole.returncode == 0, whole.stdout[-3000:]

    run_dir = tmp_path / "killed"
    cmd = FASTPPO + ["rlhf", "--run-dir", str(run_dir), "--resume"] + tiny  # --resume with nothing there starts it
    log, stages, ckpt = run_dir / "kl" / "metrics.jsonl", run_dir / "stages.pt", run_dir / "kl" / "checkpoint.pt"
    tmp_files = [run_dir / "stages.tmp", run_dir / "kl" / "checkpoint.tmp"]
    saved, mid_write, finished = 0, 0, None
    for kind, more in kill_plan(rng, kills=4):
        before = {t: stamp(t) for t in tmp_files}
        # "setup": 0-3 s after args.json appears, while the stages (SFT, reward model) are made.
        finished = killer.run(cmd, kill_condition(kind, more, log, tmp_files, before, run_dir / "args.json", 3.0, rng))
        if finished is not None:
            break
        mid_write += kind == "write" and being_written(tmp_files, before)
        if stages.exists():  # never unreadable or partial
            assert checkpoint_kind(read_checkpoint(stages)) == "rlhf stages"
        if ckpt.exists():
            state = read_checkpoint(ckpt)
            assert checkpoint_kind(state) == "rlhf PPO" and len(state["history"]) == state["iteration"]
            assert saved <= state["iteration"] < iterations
            saved = state["iteration"]
            assert log_lines(log) >= saved  # an iteration is logged before its checkpoint
    assert finished is None and mid_write >= 1, (killer.launches, mid_write)
    finished = killer.run(cmd)
    assert finished.returncode == 0, finished.stdout[-3000:]
    assert not saved or f"resumed after iteration {saved}" in finished.stdout
    records = check_log(log, iterations)
    assert not any(t.exists() for t in tmp_files)
    # The PPO checkpoint restores every random stream: the killed run ends exactly as the whole one.
    assert records == check_log(tmp_path / "whole" / "kl" / "metrics.jsonl", iterations)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "whole" / "summary.json").read_text())


# fastppo rlhf's checkpoints that cannot be continued: each is a clear error (exit 2) that leaves
# the run's files as they were. (fastppo train's are in test_train.py.)

TINY_RLHF = ["--iterations", "2", "--checkpoint-every", "1", "--sft-steps", "20", "--rm-pairs", "128",
             "--rm-heldout-pairs", "64", "--rm-epochs", "1", "--batch-size", "8", "--no-compare-kl-off", "--no-plot"]


def rlhf_main(argv: list) -> int:
    """``fastppo rlhf`` in this process, on one thread (several on a busy machine can take 10x as
    long), the thread count restored after."""
    import torch

    from fastppo.rlhf import run as R

    threads = torch.get_num_threads()
    try:
        return R.main(argv + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    """A finished two-iteration fastppo rlhf run (stages and a PPO checkpoint), copied by each test."""
    run_dir = tmp_path_factory.mktemp("rlhf") / "run"
    assert rlhf_main(["--run-dir", str(run_dir)] + TINY_RLHF) == 0
    return run_dir


def files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def resume_rlhf(run_dir: Path, capsys, *flags) -> str:
    """``fastppo rlhf --resume`` of ``run_dir``, which must fail with exit 2 and change nothing; its error."""
    before = files(run_dir)
    capsys.readouterr()
    assert rlhf_main(["--run-dir", str(run_dir), "--resume"] + TINY_RLHF + list(flags)) == 2
    assert files(run_dir) == before
    return capsys.readouterr().err


@pytest.mark.parametrize("name,damage", [("kl/checkpoint.pt", "random"), ("kl/checkpoint.pt", "truncated"),
                                         ("stages.pt", "truncated")])
def test_rlhf_damaged_checkpoint_is_a_clear_error(rlhf_run, tmp_path, capsys, name, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(rlhf_run, run_dir)
    path = run_dir / name
    data = path.read_bytes()
    path.write_bytes(random.Random(5).randbytes(len(data)) if damage == "random" else data[: len(data) // 2])
    err = resume_rlhf(run_dir, capsys, "--iterations", "3")
    assert f"error: checkpoint {path} is damaged and cannot be read" in err


def test_rlhf_refuses_train_checkpoints_and_other_settings(rlhf_run, tmp_path, capsys):
    from fastppo import train as T

    run_dir = tmp_path / "run"
    shutil.copytree(rlhf_run, run_dir)
    T.train(T.Args(run_dir=str(tmp_path), run_name="cartpole", total_timesteps=256, log_every=1000, device="cpu"))
    (run_dir / "kl" / "checkpoint.pt").write_bytes((tmp_path / "cartpole" / "checkpoint.pt").read_bytes())
    err = resume_rlhf(run_dir, capsys)
    assert "is the checkpoint of a fastppo train run on CartPole-v1" in err
    assert "not the checkpoint of a fastppo rlhf PPO run" in err
    err = resume_rlhf(tmp_path / "cartpole", capsys)  # a train run's folder as rlhf's --run-dir
    assert "holds a fastppo train run" in err

    shutil.rmtree(run_dir)
    shutil.copytree(rlhf_run, run_dir)
    err = resume_rlhf(run_dir, capsys, "--batch-size", "16")
    assert f"checkpoint {run_dir / 'kl' / 'checkpoint.pt'} is from a digits run (seed 1) with other settings" in err
    assert "--batch-size 8 (asked: 16)" in err
    err = resume_rlhf(run_dir, capsys, "--preset", "digits-hf")
    assert "stages.pt is from a digits run (seed 1); this run asks for a digits-hf run (seed 1)" in err


def test_rlhf_full_disk_keeps_the_previous_checkpoint(rlhf_run, tmp_path, monkeypatch, capsys):
    import fastppo.checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(rlhf_run, run_dir)
    ckpt = run_dir / "kl" / "checkpoint.pt"
    before = ckpt.read_bytes()

    def full_disk(path, mode="r", *args, **kwargs):
        if path.name == "checkpoint.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fastppo.checkpoint, "open", full_disk, raising=False)
    assert rlhf_main(["--run-dir", str(run_dir), "--resume"] + TINY_RLHF + ["--iterations", "3"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {ckpt} could not be written: no space left on the device (the disk is full)" in err
    assert "the previous checkpoint is kept" in err
    assert ckpt.read_bytes() == before and not (run_dir / "kl" / "checkpoint.tmp").exists()
