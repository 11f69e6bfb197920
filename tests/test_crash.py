"""Crash safety. ``fastppo train`` and ``fastppo rlhf`` killed with SIGKILL at random moments
(before the first checkpoint, after an iteration is logged, inside a checkpoint's write) and
resumed each time finish; every checkpoint a kill leaves behind reads back, and the metrics log
holds each iteration exactly once. Each moment is an event of the run (a file appearing, an
iteration logged, a write begun), never a delay, so that a run is killed at the same points on any
machine. fastppo rlhf's checkpoints that cannot be continued (damaged, from fastppo train, made
with other settings, a full disk) are each a clear error that changes nothing (fastppo train's are
in test_train.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

pytest.importorskip("torch")  # fastppo.checkpoint and the trainers need torch; a numpy-only install skips these tests
pytest.importorskip("envpool")

import fastppo  # noqa: E402
from fastppo.checkpoint import checkpoint_kind, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402

# The subprocesses import the same fastppo as this test (an installed one or the source tree), and
# run on one thread: on a small busy machine several threads each can take many times as long.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [str(Path(fastppo.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
FASTPPO = [sys.executable, "-m", "fastppo"]


class Kill:
    """One planned SIGKILL of a launch, at an event of the run, never after a delay: a fast machine
    and a slow one kill at the same point of the run.

    ``after``, the event: ``("file", path)`` (``path`` appears) or ``("iteration", t)`` (the launch
    has logged iteration ``t`` in ``log``).
    ``write``: None to kill as soon as the event is seen; a checkpoint's temporary file to kill the
    launch inside its next write of that file after the event, before the rename. The write is held
    there by a FIFO put in the file's place while the launch is stopped (``SIGSTOP``); after the kill
    the FIFO becomes a regular file holding the bytes the launch wrote, as a killed write leaves it."""

    def __init__(self, after: tuple, log: Optional[Path] = None, write: Optional[Path] = None):
        self.after, self.log, self.write = after, log, write
        self.mid_write = False  # the kill landed inside a write of ``write``

    def arm(self) -> None:
        """Before the launch: what is there already."""
        self.fd, self.seen = None, False
        self.before = {p: stamp(p) for p in (self.log, self.write) if p is not None}

    def _event(self) -> bool:
        what, arg = self.after
        if what == "file":
            return arg.exists()
        # A resumed launch first cuts the log back to its checkpoint: lines older than it do not count.
        return stamp(self.log) != self.before[self.log] and log_lines(self.log) >= arg

    def due(self, proc: subprocess.Popen) -> bool:
        """Whether to kill ``proc`` now (polled every millisecond)."""
        if self.fd is not None:  # the trap is set: the launch has written into it
            return pending_bytes(self.fd) > 0
        if not self.seen and not self._event():
            return False
        if self.write is None:
            return True
        self.seen = True
        proc.send_signal(signal.SIGSTOP)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):  # it ended meanwhile
            proc.returncode = os.waitstatus_to_exitcode(status)
            return False
        if stamp(self.write) not in (None, self.before[self.write]):  # stopped inside the write itself
            self.mid_write = True
            return True
        self._trap()
        proc.send_signal(signal.SIGCONT)
        return False

    def _trap(self) -> None:
        """A FIFO in place of ``write``, read end open, with a one-page buffer that nothing reads: the
        launch's next write of the file fills the page and blocks there (a checkpoint is larger)."""
        fifo = self.write.with_name(self.write.name + ".fifo")
        os.mkfifo(fifo)
        os.replace(fifo, self.write)
        self.fd = os.open(self.write, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)

    def landed(self) -> None:
        """After the kill (or the end): the trap, if set, becomes the partial file a killed write leaves."""
        if self.fd is None:
            return
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 1 << 16):
                data += chunk
        os.close(self.fd)
        self.fd, self.mid_write = None, bool(data)
        partial = self.write.with_name(self.write.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, self.write)


def pending_bytes(fd: int) -> int:
    """Bytes written into a pipe and not read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


class Killer:
    """Starts commands and SIGKILLs each at its planned ``Kill`` (or lets it finish)."""

    def __init__(self, cwd: Path):
        self.cwd, self.launches = cwd, 0

    def run(self, cmd: list, kill: Optional[Kill] = None,
            timeout: float = 120.0) -> Optional[subprocess.CompletedProcess]:
        """Runs ``cmd``; with ``kill``, kills it at that kill's moment. Returns the finished process
        (its output in ``stdout``), or None if it was killed."""
        self.launches += 1
        out = self.cwd / f"launch{self.launches}.log"
        if kill is not None:
            kill.arm()
        with open(out, "w") as log:
            proc = subprocess.Popen(cmd, env=ENV, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"{cmd} ran past {timeout}s: {out.read_text()[-2000:]}"
                if kill is not None and kill.due(proc):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return None
                time.sleep(0.001 if kill is not None else 0.05)
        finally:
            if proc.poll() is None:  # a failed assertion: nothing left running or stopped
                proc.kill()
                proc.wait()
            if kill is not None:
                kill.landed()
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


def kill_plan(rng: random.Random, first: Kill, kills: int, last: int, log: Path, tmp: Path) -> list:
    """The kills, in order: ``first`` (in the setup); then, at ``kills - 1`` increasing iterations
    drawn from 1..``last``, two inside the checkpoint write that follows the iteration being logged
    and the others (in a random order among them) as soon as it is logged. Each kill's iteration is
    past where the launch before it was killed, so every launch reaches its own kill."""
    ats = sorted(rng.sample(range(1, last + 1), kills - 1))
    writes = [True] * 2 + [False] * (kills - 3)
    rng.shuffle(writes)
    return [first] + [Kill(("iteration", at), log, tmp if write else None) for at, write in zip(ats, writes)]


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
    # The first launch is killed as its config.json appears (before the first checkpoint); the others
    # at iterations in the first half of the run.
    plan = kill_plan(rng, Kill(("file", run_dir / "config.json")), 5, iterations // 2, log, tmp)
    saved, resume_points, finished = 0, {1}, None
    for kill in plan:
        # Killed before it wrote config.json, a run is started anew; after, --resume continues it (from
        # its config.json alone when no checkpoint was written yet).
        cmd = resume if (run_dir / "config.json").exists() else fresh
        finished = killer.run(cmd, kill)
        if finished is not None:
            break
        if ckpt.exists():  # never unreadable or partial: a kill leaves the last complete checkpoint
            state = load_checkpoint(ckpt)
            assert saved <= state["iteration"] < iterations
            saved = state["iteration"]
            assert log_lines(log) >= saved  # an iteration is logged before its checkpoint
        resume_points.add(saved + 1)
    assert finished is None, (killer.launches, finished.stdout[-3000:])
    assert [k.mid_write for k in plan if k.write] == [True, True]  # each write kill landed before the rename
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
    # The first launch is killed inside its write of stages.pt (SFT and the reward model made, the file
    # not renamed yet); the others at iterations up to three before the end.
    setup = Kill(("file", run_dir / "args.json"), write=tmp_files[0])
    plan = kill_plan(rng, setup, 4, iterations - 3, log, tmp_files[1])
    saved, finished = 0, None
    for kill in plan:
        finished = killer.run(cmd, kill)
        if finished is not None:
            break
        if stages.exists():  # never unreadable or partial
            assert checkpoint_kind(read_checkpoint(stages)) == "rlhf stages"
        if ckpt.exists():
            state = read_checkpoint(ckpt)
            assert checkpoint_kind(state) == "rlhf PPO" and len(state["history"]) == state["iteration"]
            assert saved <= state["iteration"] < iterations
            saved = state["iteration"]
            assert log_lines(log) >= saved  # an iteration is logged before its checkpoint
    assert finished is None, (killer.launches, finished.stdout[-3000:])
    assert [k.mid_write for k in plan if k.write] == [True] * 3  # each write kill landed before the rename
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


def test_rlhf_run_saved_under_the_old_setting_names_resumes(rlhf_run, tmp_path, capsys):
    """A run saved when PPOConfig said cliprange, cliprange_value and lam (TRL's names) resumes, and
    its settings are compared with the asked ones as clip_coef, vf_clip_coef and gae_lambda."""
    old_names = {"clip_coef": "cliprange", "vf_clip_coef": "cliprange_value", "gae_lambda": "lam"}

    def with_old_names(settings: dict) -> dict:
        assert old_names.keys() <= settings.keys()
        return {old_names.get(name, name): value for name, value in settings.items()}

    run_dir = tmp_path / "run"
    shutil.copytree(rlhf_run, run_dir)
    ckpt, stages = run_dir / "kl" / "checkpoint.pt", run_dir / "stages.pt"
    state = read_checkpoint(ckpt)
    state["settings"] = with_old_names(state["settings"])
    state["trainer"]["config"] = with_old_names(state["trainer"]["config"])
    save_checkpoint(ckpt, state)
    saved_stages = read_checkpoint(stages)
    saved_stages["args"]["ppo"] = with_old_names(saved_stages["args"]["ppo"])
    save_checkpoint(stages, saved_stages)
    args = json.loads((run_dir / "args.json").read_text())
    (run_dir / "args.json").write_text(json.dumps({**args, "ppo": with_old_names(args["ppo"])}, indent=1))

    err = resume_rlhf(run_dir, capsys, "--iterations", "3", "--clip-coef", "0.1")
    assert "with other settings than asked: --clip-coef 0.2 (asked: 0.1)" in err  # the same setting under both names
    with pytest.warns(DeprecationWarning, match="fastppo rlhf's flag --lam is renamed --gae-lambda"):
        err = resume_rlhf(run_dir, capsys, "--iterations", "3", "--lam", "0.9")
    assert "--gae-lambda 0.95 (asked: 0.9)" in err
    assert rlhf_main(["--run-dir", str(run_dir), "--resume"] + TINY_RLHF + ["--iterations", "3"]) == 0
    assert "kl: resumed after iteration 2" in capsys.readouterr().out
    state = read_checkpoint(ckpt)
    assert state["iteration"] == 3 and state["settings"]["clip_coef"] == 0.2 and "cliprange" not in state["settings"]
    lines = (run_dir / "kl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]


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
