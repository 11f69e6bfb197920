"""The EnvPool trainer: presets run, bad settings fail fast, episodes are counted right, and
CartPole learns."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

pytest.importorskip("envpool")

import fastppo.checkpoint  # noqa: E402
from fastppo import train as T  # noqa: E402
from fastppo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from fastppo.rollout import AsyncRollout, rollout_advantages  # noqa: E402
from fastppo.evaluate import evaluate  # noqa: E402


def run(tmp_path, **changes):
    args = T.Args(run_dir=str(tmp_path), run_name="run", log_every=1000, **changes)
    return T.train(args)


@pytest.mark.parametrize(
    "env_id,steps,preset",
    [("CartPole-v1", 1024, "auto"), ("CartPole-v1", 1024, "classic"), ("Acrobot-v1", 1024, "auto"),
     ("HalfCheetah-v5", 2048, "auto"), ("Pong-v5", 1024, "auto")],
)
def test_each_preset_builds_and_runs(tmp_path, env_id, steps, preset):
    summary = run(tmp_path, env_id=env_id, total_timesteps=steps, preset=preset)
    expected = {"CartPole-v1": "classic-fast", "Acrobot-v1": "classic", "HalfCheetah-v5": "mujoco-zoo", "Pong-v5": "atari"}
    preset = expected[env_id] if preset == "auto" else preset
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
        (dict(env_id="NotAnEnv-v0"), ["--env-id", "NotAnEnv-v0", "not an EnvPool or gymnasium task"]),
        (dict(num_minibatches=7), ["--num-minibatches", "(7)", "8 * 32"]),
        (dict(num_minibatches=7, preset="classic"), ["--num-minibatches", "(7)", "4 * 128"]),
        (dict(policy_backend="jit"), ["--policy-backend", "jit"]),
        (dict(env_id="Pong-v5", policy_backend="fused"), ["--policy-backend fused", "MLP policies"]),
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
    assert "--no-anneal-lr" in out.stdout and "--no-clip-vloss" in out.stdout and "the preset's" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fastppo", "train", "--num-minibatches", "7", "--run-dir", "/nonexistent"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "must divide" in bad.stderr


@pytest.mark.learning
def test_cartpole_learns_for_each_of_three_seeds(tmp_path):
    # The default preset (classic-fast), CPU: mean return of the last 100 episodes >= 195 within 150k steps.
    for seed in (1, 2, 3):
        summary = run(tmp_path / str(seed), env_id="CartPole-v1", total_timesteps=150_000, seed=seed, device="cpu")
        assert summary["episodic_return"] >= 195, (seed, summary)


def test_dummy_reset_steps_are_masked_and_truncation_bootstraps():
    # One env: episode A runs steps 0..2 and is truncated at 2; step 3 is EnvPool's dummy reset
    # step (reward 0, from A's final observation); episode B runs steps 4..5.
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [2.0], [3.0], [0.0], [5.0], [6.0]], dtype=torch.float64)
    values = torch.tensor([[0.5], [0.4], [0.3], [7.0], [0.2], [0.1]], dtype=torch.float64)  # 7.0: V(final obs of A)
    dones = torch.tensor([[0], [0], [1], [0], [0], [0]], dtype=torch.bool)
    terminated = torch.zeros(6, 1, dtype=torch.bool)
    real = torch.tensor([[1], [1], [1], [0], [1], [1]], dtype=torch.bool)
    next_value = torch.tensor([0.05], dtype=torch.float64)
    adv, _ = rollout_advantages(rewards, values, dones, terminated, real, next_value, g, lam)
    a5 = 6.0 + g * 0.05 - 0.1
    a4 = (5.0 + g * 0.1 - 0.2) + g * lam * a5
    a2 = 3.0 + g * 7.0 - 0.3  # truncated: bootstraps from the final observation's value
    a1 = (2.0 + g * 0.3 - 0.4) + g * lam * a2
    a0 = (1.0 + g * 0.4 - 0.5) + g * lam * a1
    torch.testing.assert_close(adv[[0, 1, 2, 4, 5], 0], torch.tensor([a0, a1, a2, a4, a5], dtype=torch.float64))
    # Terminated instead: no bootstrap.
    adv_t, _ = rollout_advantages(rewards, values, dones, dones, real, next_value, g, lam)
    assert adv_t[2, 0].item() == pytest.approx(3.0 - 0.3)


@pytest.mark.parametrize("env_id,backend", [("CartPole-v1", "fused"), ("CartPole-v1", "torch"), ("HalfCheetah-v5", "fused")])
def test_kill_and_resume_equals_uninterrupted(tmp_path, env_id, backend):
    settings = dict(env_id=env_id, total_timesteps=6 * 4 * 64, num_envs=4, num_steps=64, checkpoint_every=3,
                    device="cpu", policy_backend=backend, resume_replay=True)
    whole = T.train(T.Args(run_dir=str(tmp_path), run_name="whole", log_every=1000, **settings))
    T.train(T.Args(run_dir=str(tmp_path), run_name="split", log_every=1000, **settings), stop_after=3)
    log = tmp_path / "split" / "metrics.jsonl"  # iteration 4 logged, then killed before its checkpoint
    log.write_text(log.read_text() + json.dumps(dict(json.loads(log.read_text().splitlines()[-1]), iteration=4)) + "\n")
    resumed = T.train(T.Args(), resume=str(tmp_path / "split"))
    assert resumed["global_step"] == whole["global_step"] and resumed["episodes"] == whole["episodes"]

    def metrics(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time") and k not in ("sps", "first_iteration")} for r in rows]

    assert metrics("split") == metrics("whole")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("async_batch_size", [None, 4])
def test_resume_with_fresh_environments_costs_o1(tmp_path, async_batch_size):
    """The default resume: model, optimizer, statistics, random streams and counters restored, new
    environments; no action log, so the checkpoint does not grow with the run."""
    batch = (async_batch_size or 8) * 32
    settings = dict(env_id="CartPole-v1", preset="classic", total_timesteps=8 * batch, num_envs=8, num_steps=32,
                    checkpoint_every=2, device="cpu", async_batch_size=async_batch_size, log_every=1000)
    T.train(T.Args(run_dir=str(tmp_path), run_name="r", **settings), stop_after=2)
    path = tmp_path / "r" / "checkpoint.pt"
    early = torch.load(path, weights_only=False)
    assert "actions" not in early and early["iteration"] == 2
    size_early = path.stat().st_size
    log = tmp_path / "r" / "metrics.jsonl"  # iteration 3 logged, then killed before its checkpoint
    log.write_text(log.read_text() + json.dumps(dict(json.loads(log.read_text().splitlines()[-1]), iteration=3)) + "\n")
    resumed = T.train(T.Args(), resume=str(tmp_path / "r"))
    late = torch.load(path, weights_only=False)
    assert late["iteration"] == 8 and resumed["global_step"] == late["global_step"] == 8 * batch
    assert abs(path.stat().st_size - size_early) < 4096  # the same tensors, a few more finished episodes
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == list(range(1, 9))
    assert late["boundary"]["episodes"] > early["boundary"]["episodes"]


def test_resume_with_another_policy_backend_is_refused(tmp_path):
    settings = dict(env_id="CartPole-v1", total_timesteps=4 * 4 * 32, num_envs=4, num_steps=32, checkpoint_every=1)
    T.train(T.Args(run_dir=str(tmp_path), run_name="run", log_every=1000, policy_backend="fused", **settings), stop_after=1)
    config = tmp_path / "run" / "config.json"
    config_data = json.loads(config.read_text())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    state["args"]["policy_backend"] = "torch"
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="--policy-backend fused; this run would use torch"):
        T.train(T.Args(), resume=str(tmp_path / "run"))
    assert json.loads(config.read_text()) == config_data


def _iterations(run_dir):
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    settings = dict(env_id="CartPole-v1", total_timesteps=5 * 8 * 32, checkpoint_every=2, device="cpu", log_every=1000)
    T.train(T.Args(run_dir=str(tmp_path), run_name="run", **settings), stop_after=2)
    log = tmp_path / "run" / "metrics.jsonl"
    last = log.read_text().splitlines()[-1]
    log.write_text(log.read_text() + json.dumps(dict(json.loads(last), iteration=3)) + "\n" + last[:40])
    assert T.main(["--resume", str(tmp_path / "run")]) == 0
    assert _iterations(tmp_path / "run") == [1, 2, 3, 4, 5]


def test_resume_before_the_first_checkpoint_starts_the_run_over(tmp_path, capsys):
    settings = dict(env_id="CartPole-v1", total_timesteps=3 * 8 * 32, checkpoint_every=2, device="cpu", log_every=1000)
    T.train(T.Args(run_dir=str(tmp_path), run_name="run", **settings), stop_after=1)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint.pt").unlink()  # killed after logging iteration 1, before any checkpoint
    config = (run_dir / "config.json").read_text()
    assert T.main(["--resume", str(run_dir)]) == 0
    assert "has no checkpoint (the run stopped before its first one): starting it over" in capsys.readouterr().err
    assert _iterations(run_dir) == [1, 2, 3] and (run_dir / "config.json").read_text() == config
    assert load_checkpoint(run_dir)["iteration"] == 3
    T.train(T.Args(run_dir=str(tmp_path), run_name="run", **settings))  # a new run in the same folder: a new log
    assert _iterations(run_dir) == [1, 2, 3]


def _tiny_run(tmp_path, name, env_id):
    steps = dict(total_timesteps=64, num_envs=1, num_steps=64, num_minibatches=1, update_epochs=1)
    T.train(T.Args(env_id=env_id, run_dir=str(tmp_path), run_name=name, log_every=1000, device="cpu", **steps))
    return tmp_path / name


def _files(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


def test_checkpoint_from_another_task_is_refused_naming_both(tmp_path, capsys):
    cheetah, cartpole = _tiny_run(tmp_path, "cheetah", "HalfCheetah-v5"), _tiny_run(tmp_path, "cartpole", "CartPole-v1")
    # A HalfCheetah checkpoint in a CartPole run's folder.
    (cartpole / "checkpoint.pt").write_bytes((cheetah / "checkpoint.pt").read_bytes())
    before = _files(cartpole)
    assert T.main(["--resume", str(cartpole)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {cartpole / 'checkpoint.pt'} is from a HalfCheetah-v5 run" in err
    assert "holds a CartPole-v1 run (config.json)" in err and _files(cartpole) == before
    # Settings for another task beside a resume.
    with pytest.raises(CheckpointError, match="is from a HalfCheetah-v5 run; this run asks for CartPole-v1"):
        T.train(T.Args(env_id="CartPole-v1", total_timesteps=1024), resume=str(cheetah))
    with pytest.raises(CheckpointError, match=r"asks for CartPole-v1 .*--seed 1 \(asked: 2\)"):
        T.train(T.Args(env_id="CartPole-v1", seed=2), resume=str(cheetah))
    with pytest.raises(CheckpointError, match=r"other settings than asked: .*--seed 1 \(asked: 2\)"):
        T.train(T.Args(env_id="HalfCheetah-v5", seed=2), resume=str(cheetah))
    # A HalfCheetah model under CartPole's settings.
    state = torch.load(cheetah / "checkpoint.pt", weights_only=True)
    state["args"] = json.loads((cartpole / "config.json").read_text())
    (tmp_path / "alone").mkdir()
    save_checkpoint(tmp_path / "alone" / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=r"holds a model that does not fit CartPole-v1 \(observations \(4,\)"):
        T.train(T.Args(), resume=str(tmp_path / "alone"))


def test_rlhf_checkpoints_given_to_train_say_what_they_are(tmp_path, capsys):
    (tmp_path / "kl").mkdir()
    save_checkpoint(tmp_path / "kl" / "checkpoint.pt", {"trainer": {}, "history": [], "iteration": 2})
    save_checkpoint(tmp_path / "stages.pt", {"args": {}, "sft": {}, "rm": {}, "report": {}})
    before = _files(tmp_path / "kl")
    assert T.main(["--resume", str(tmp_path / "kl")]) == 2
    err = capsys.readouterr().err
    assert "is the checkpoint of a fastppo rlhf PPO run (iteration 2; continue it with fastppo rlhf --resume" in err
    assert "not a fastppo training checkpoint" in err and _files(tmp_path / "kl") == before
    with pytest.raises(CheckpointError, match="is the stages .* of a fastppo rlhf run"):
        load_checkpoint(tmp_path / "stages.pt")


def test_truncated_checkpoint_is_a_clear_error_that_changes_nothing(tmp_path, capsys):
    run_dir = _tiny_run(tmp_path, "run", "CartPole-v1")
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _files(run_dir)
    assert T.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"fastppo train: error: checkpoint {path} is damaged and cannot be read" in err and _files(run_dir) == before


@pytest.mark.learning
def test_fused_and_torch_backends_learn_alike(tmp_path):
    # Same preset and seed, the two backends: both solve CartPole (their sampling noise differs).
    for backend in ("fused", "torch"):
        summary = run(tmp_path / backend, env_id="CartPole-v1", total_timesteps=100_000, policy_backend=backend)
        assert summary["policy_backend"] == backend
        assert summary["episodic_return"] >= 195, (backend, summary)


def test_checkpoint_write_that_dies_leaves_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no partial temporary file left


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: a write past them fails as a full disk does."""

    room = 4096

    def write(self, data):
        if self.tell() + len(memoryview(data).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_full_disk_is_a_clear_error_that_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(fastppo.checkpoint, "open", _FullDisk, raising=False)  # the real torch.save on a full disk
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(10_000)})
    message = str(info.value)
    assert str(path) in message and "no space left" in message and "disk is full" in message
    assert "previous checkpoint is kept" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_train_stops_on_a_full_disk_and_resumes_from_the_checkpoint_before(tmp_path, monkeypatch, capsys):
    flags = ["--total-timesteps", str(6 * 8 * 32), "--checkpoint-every", "2", "--device", "cpu", "--run-dir",
             str(tmp_path), "--run-name", "run", "--log-every", "1000"]
    run_dir, opened, kept = tmp_path / "run", [], []

    def open_on_a_disk_that_fills(path, mode="r", *args, **kwargs):
        opened.extend([path] if path.name == "checkpoint.tmp" else [])
        if len(opened) < 2:  # the second checkpoint's write fills the disk
            return open(path, mode, *args, **kwargs)
        kept.append((run_dir / "checkpoint.pt").read_bytes())
        return _FullDisk(path, mode)

    monkeypatch.setattr(fastppo.checkpoint, "open", open_on_a_disk_that_fills, raising=False)
    assert T.main(flags) == 2
    err = capsys.readouterr().err
    assert "fastppo train: error: checkpoint" in err and "no space left" in err and "previous checkpoint is kept" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == kept[0] and load_checkpoint(run_dir)["iteration"] == 2
    assert not (run_dir / "checkpoint.tmp").exists()
    monkeypatch.undo()  # space freed
    assert T.main(["--resume", str(run_dir)]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == list(range(1, 7))


def test_damaged_or_foreign_checkpoints_are_reported_clearly(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is damaged"):
        load_checkpoint(tmp_path)
    torch.save({"model": {}}, bad)
    with pytest.raises(CheckpointError, match="not a fastppo training checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "elsewhere")
    out = subprocess.run([sys.executable, "-m", "fastppo", "eval", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a fastppo training checkpoint" in out.stderr


def test_eval_reports_mean_and_std_with_saved_normalization(tmp_path):
    summary = run(tmp_path, env_id="HalfCheetah-v5", total_timesteps=2048)
    result = evaluate(summary["run_dir"], episodes=2)
    assert result["episodes"] == 2 and np.isfinite(result["mean_return"]) and result["std_return"] >= 0
    out = subprocess.run([sys.executable, "-m", "fastppo", "eval", summary["run_dir"], "--episodes", "1"],
                         capture_output=True, text=True, check=True)
    assert "+-" in out.stdout and "over 1 episodes" in out.stdout


import gymnasium  # noqa: E402


class _Countdown(gymnasium.Env):
    """A tiny gymnasium env EnvPool does not have: observation [steps left], reward 1 per step,
    terminated when the count reaches 0 (after 5 steps, whatever the actions)."""

    def __init__(self):
        import gymnasium as gym

        self.observation_space = gym.spaces.Box(-1.0, 10.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.left = 5

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.left = 5
        return np.array([self.left], np.float32), {}

    def step(self, action):
        self.left -= 1
        return np.array([self.left], np.float32), 1.0, self.left == 0, False, {}

def test_gymnasium_fallback_for_tasks_envpool_lacks(tmp_path):
    import gymnasium as gym

    gym.register("FastppoCountdown-v0", entry_point=_Countdown)
    summary = run(tmp_path, env_id="FastppoCountdown-v0", total_timesteps=4 * 128 * 2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == "classic"
    assert summary["episodic_return"] == 5.0  # every episode: 5 rewarded steps, dummy steps not counted


class _ScriptedAsyncEnvs:
    """EnvPool's async interface over a fixed schedule: recv k hands back the env ids in
    schedule[k]; the j-th time env e comes back it reports reward 1 + e + j and ends where
    `ends` says (terminated)."""

    def __init__(self, schedule, ends):
        self.schedule, self.ends, self.k = schedule, ends, 0
        self.seen = {}

    def async_reset(self):
        pass

    def recv(self):
        ids = np.array(self.schedule[self.k])
        self.k += 1
        reward, term = [], []
        for e in ids:
            j = self.seen.get(int(e), -1) + 1
            self.seen[int(e)] = j
            reward.append(0.0 if j == 0 else 1.0 + e + j)
            term.append((int(e), j) in self.ends)
        obs = ids[:, None].astype(np.float32)
        return obs, np.array(reward, np.float32), np.array(term), np.zeros(len(ids), bool), {"env_id": ids}

    def send(self, actions, ids):
        pass


def test_async_rollout_advantages_follow_each_env():
    import fastppo
    from fastppo.envstep import EnvStepBoundary
    from references import gae_reference

    schedule = [[0, 1], [2, 0], [1, 2], [0, 1], [2, 0], [1, 2], [0, 2]]
    ends = {(1, 2), (0, 2)}
    envs = _ScriptedAsyncEnvs(schedule, ends)
    rollout = AsyncRollout(envs, EnvStepBoundary(3, (1,)), "classic", len(schedule), 2, (1,), np.float32, "cpu")
    for t in range(len(schedule)):
        rollout.recv(t)
    values = torch.arange(len(schedule) * 2, dtype=torch.float64) * 0.1 + 0.05
    gamma, lam = 0.9, 0.8
    adv, ret = rollout.advantages(values, gamma, lam, fastppo.gae)
    # The reference: per env, its slots in order; slot k's outcome is what its (k+1)-th return
    # brought; the last slot is in flight and only bootstraps.
    for e in range(3):
        slots = [i for i, env in enumerate(rollout.env) if env == e]
        appearances = [(k, j) for k, ids in enumerate(schedule) for j, x in enumerate(ids) if x == e]
        rewards, dones, real = [], [], []
        for n in range(len(slots) - 1):
            rewards.append(1.0 + e + (n + 1))
            dones.append((e, n + 1) in ends)
            real.append(n == 0 or (e, n) not in ends)
        assert len(appearances) == len(slots)
        assert rollout.real[slots[:-1]].tolist() == real  # the slot after an end is the dummy reset step
        v = values[slots].numpy()
        d = np.array(dones) | ~np.array(real)
        expected_adv, expected_ret = gae_reference(np.array(rewards)[:, None], v[:-1, None], d[:, None], v[-1:],
                                                   d[:, None], gamma=gamma, gae_lambda=lam)
        mask = rollout.real[slots[:-1]]
        np.testing.assert_allclose(adv[slots[:-1]].numpy()[mask], expected_adv[:, 0][mask], rtol=1e-12)
        np.testing.assert_allclose(ret[slots[:-1]].numpy()[mask], expected_ret[:, 0][mask], rtol=1e-12)
        assert not rollout.real[slots[-1]]  # in flight: masked out


@pytest.mark.learning
def test_async_mode_trains(tmp_path):
    summary = run(tmp_path, env_id="CartPole-v1", num_envs=8, async_batch_size=4, total_timesteps=50_000, device="cpu")
    assert summary["global_step"] >= 49_000
    assert summary["episodic_return"] >= 100  # a random policy averages about 22
    with pytest.raises(ValueError, match="--resume-replay needs sync environments"):
        run(tmp_path, env_id="CartPole-v1", num_envs=8, async_batch_size=4, resume_replay=True)
    with pytest.raises(ValueError, match="--async-batch-size must be in"):
        run(tmp_path, env_id="CartPole-v1", num_envs=4, async_batch_size=4)


def test_cli_resume_takes_a_run_directory_and_nothing_else(capsys):
    assert T.main(["--resume"]) == 2 and T.main(["--seed", "2", "--resume", "runs/x"]) == 2
    assert "--resume takes a run directory and no other flag" in capsys.readouterr().err


def test_progress_without_a_terminal_prints_every_nth_line_with_its_eta(capsys):
    from fastppo.progress import Progress

    progress = Progress(total=5, done=1, every=2, name="kl")  # resumed after iteration 1
    for iteration in range(2, 6):
        progress.update(iteration, "score 1.0")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" score")[0] for line in lines] == ["[kl 2/5]", "[kl 4/5]", "[kl 5/5]"]
    assert all(line.endswith("s") and "| eta " in line for line in lines)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_checkpoints_are_data_not_code(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="data, not code"):
        load_checkpoint(path)
    save_checkpoint(path, {"a": np.arange(3), "b": (np.float64(2.0), [np.zeros(2, np.bool_)]), "c": {"d": "text"}})
    state = torch.load(path, weights_only=True)  # numpy became tensors and numbers
    assert torch.equal(state["a"], torch.arange(3)) and state["b"][0] == 2.0 and state["c"]["d"] == "text"
    assert state["b"][1][0].dtype == torch.bool


def test_learner_backends_make_the_same_update_and_target_kl_stops_after_an_epoch():
    import copy

    import gymnasium as gym

    from fastppo.agent import Agent
    from fastppo.learner import Batch, Learner

    torch.manual_seed(0)
    agent = Agent((4,), gym.spaces.Discrete(3), "classic")
    g = torch.Generator().manual_seed(1)
    n = 128
    batch = Batch(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), -torch.rand(n, generator=g) - 0.5,
                  torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g),
                  torch.rand(n, generator=g) > 0.2)
    settings = dict(lr=1e-2, ent_coef=0.01, update_epochs=3, num_minibatches=4)
    for target_kl, steps in ((None, 12), (0.0, 4)):  # approx_kl > 0 after the first epoch: it stops there
        learners = [Learner(copy.deepcopy(agent), backend, target_kl=target_kl, **settings) for backend in ("fused", "torch")]
        means = []
        for learner in learners:
            torch.manual_seed(2)  # the same minibatch orders
            means.append(learner.update(batch))
        np.testing.assert_allclose(means[0], means[1], rtol=1e-4, atol=1e-6)
        assert learners[0].fused.step == steps
        assert all(s["step"] == steps for s in learners[1].optimizer.state_dict()["state"].values())
        for p, q in zip(learners[0].agent.parameters(), learners[1].agent.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be fused or torch, got 'jit'"):
        Learner(agent, "jit")
    with pytest.raises(ValueError, match="num_minibatches must be an integer >= 1, got 0"):
        Learner(agent, num_minibatches=0)


def test_names_stay_importable_from_where_they_were():
    import fastppo.envs
    from fastppo import agent, config, learner, rollout, runs

    for name in ("Args", "PRESETS", "FAST_PRESET_TASKS", "FromPreset", "resolve", "rank_share", "train_device",
                 "policy_backend"):
        assert getattr(T, name) is getattr(config, name), name
    for name in ("Agent", "Kernels", "layer_init"):
        assert getattr(T, name) is getattr(agent, name), name
    for name in ("keep_log_until", "resume_state", "saved_args", "check_resumed_settings", "PLACE_SETTINGS"):
        assert getattr(T, name) is getattr(runs, name), name
    assert T.UPDATE_STATS is learner.UPDATE_STATS
    assert fastppo.envs.AsyncRollout is rollout.AsyncRollout
    assert fastppo.envs.rollout_advantages is rollout.rollout_advantages
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        fastppo.envs.Missing  # noqa: B018
