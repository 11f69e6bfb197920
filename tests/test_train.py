"""The EnvPool trainer: presets run, bad settings fail fast, episodes are counted right, and
CartPole learns."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("envpool")

from fastppo import train as T  # noqa: E402


def run(tmp_path, **changes):
    args = T.Args(run_dir=str(tmp_path), run_name="run", log_every=1000, **changes)
    return T.train(args)


@pytest.mark.parametrize(
    "env_id,steps,preset",
    [("CartPole-v1", 1024, "classic"), ("HalfCheetah-v5", 2048, "mujoco"), ("Pong-v5", 1024, "atari")],
)
def test_each_preset_builds_and_runs(tmp_path, env_id, steps, preset):
    summary = run(tmp_path, env_id=env_id, total_timesteps=steps)
    assert summary["global_step"] >= steps // 2
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["preset"] == preset
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["pg_loss"]) and r["sps"] > 0 for r in records)
    for key in ("approx_kl", "clipfrac", "explained_variance", "learning_rate", "time_env", "time_learn"):
        assert key in records[-1]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["global_step"] == summary["global_step"] and "model" in checkpoint


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(env_id="NotAnEnv-v0"), ["--env-id", "NotAnEnv-v0", "not an EnvPool task"]),
        (dict(num_minibatches=7), ["--num-minibatches", "(7)", "4 * 128"]),
        (dict(clip_coef=-0.1), ["--clip-coef", "> 0"]),
        (dict(gamma=1.5), ["--gamma", "in [0, 1]"]),
        (dict(preset="fast"), ["--preset", "fast"]),
        (dict(device="tpu"), ["--device", "tpu"]),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, changes, words):
    with pytest.raises(ValueError) as info:
        run(tmp_path, **changes)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "run").exists()


def test_cli_help_comes_from_the_dataclass_docstrings():
    out = subprocess.run([sys.executable, "-m", "fastppo", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--env-id" in out.stdout and "the EnvPool task id" in out.stdout
    assert "--num-minibatches" in out.stdout and "minibatches per epoch" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fastppo", "train", "--num-minibatches", "7", "--run-dir", "/nonexistent"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "must divide" in bad.stderr


def test_episode_tracker_across_dummy_reset_steps():
    tracker = T.EpisodeTracker(num_envs=2)
    # env 0: rewards 1, 2, ends; dummy step (reward 0, not real); new episode 5, ...
    # env 1: rewards 3, 3, 3 without ending.
    steps = [
        (np.array([1.0, 3.0]), np.array([True, True]), np.array([False, False])),
        (np.array([2.0, 3.0]), np.array([True, True]), np.array([True, False])),
        (np.array([7.0, 3.0]), np.array([False, True]), np.array([False, False])),  # dummy for env 0
        (np.array([5.0, 0.0]), np.array([True, True]), np.array([False, False])),
    ]
    finished = [tracker.step(*s) for s in steps]
    assert finished[1] == [(3.0, 2)]
    assert tracker.count == 1 and tracker.mean_return() == 3.0
    assert tracker.returns.tolist() == [5.0, 9.0] and tracker.lengths.tolist() == [1, 4]


def test_cartpole_learns_for_each_of_three_seeds(tmp_path):
    # The default preset, CPU: mean return of the last 100 episodes >= 195 within 150k steps.
    for seed in (1, 2, 3):
        summary = run(tmp_path / str(seed), env_id="CartPole-v1", total_timesteps=150_000, seed=seed, device="cpu")
        assert summary["episodic_return"] >= 195, (seed, summary)
