"""Crash safety: fastppo rlhf's checkpoints that cannot be continued (damaged, from fastppo train,
made with other settings, a full disk) are each a clear error (exit 2) that leaves the run's files
as they were. (fastppo train's are in test_train.py.)"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("envpool")


TINY_RLHF = ["--iterations", "2", "--checkpoint-every", "1", "--sft-steps", "20", "--rm-pairs", "128",
             "--rm-heldout-pairs", "64", "--rm-epochs", "1", "--batch-size", "8", "--no-compare-kl-off", "--no-plot"]


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    """A finished two-iteration fastppo rlhf run (stages and a PPO checkpoint), copied by each test."""
    from fastppo.rlhf import run as R

    run_dir = tmp_path_factory.mktemp("rlhf") / "run"
    assert R.main(["--run-dir", str(run_dir)] + TINY_RLHF) == 0
    return run_dir


def files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def resume_rlhf(run_dir: Path, capsys, *flags) -> str:
    """``fastppo rlhf --resume`` of ``run_dir``, which must fail with exit 2 and change nothing; its error."""
    from fastppo.rlhf import run as R

    before = files(run_dir)
    capsys.readouterr()
    assert R.main(["--run-dir", str(run_dir), "--resume"] + TINY_RLHF + list(flags)) == 2
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
    from fastppo.rlhf import run as R

    assert R.main(["--run-dir", str(run_dir), "--resume"] + TINY_RLHF + ["--iterations", "3"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {ckpt} could not be written: no space left on the device (the disk is full)" in err
    assert "the previous checkpoint is kept" in err
    assert ckpt.read_bytes() == before and not (run_dir / "kl" / "checkpoint.tmp").exists()
