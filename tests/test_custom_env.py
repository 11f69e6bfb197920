"""Your own environment: ``fastppo train --env-id MODULE:ID`` imports MODULE (which registers ID with
gymnasium) and trains on gymnasium's vector env; eval and export find it again from the run's
config. An environment package is written here, as a user would write it."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("envpool")
pytest.importorskip("gymnasium")

from fastppo import cli  # noqa: E402
from fastppo.envs import env_family  # noqa: E402
from fastppo.evaluate import evaluate  # noqa: E402

PACKAGE = "fastppo_user_envs"  # a name no installed package has

ENVS = '''
import gymnasium as gym
import numpy as np


class GoRight(gym.Env):
    """Walk from 0 to 4 on a line: action 1 steps right, 0 left; reward 1 on reaching 4, -0.01 per step."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(0.0, 4.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.position = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return np.array([self.position], np.float32), {}

    def step(self, action):
        self.position = min(4, max(0, self.position + (1 if action == 1 else -1)))
        done = self.position == 4
        return np.array([self.position], np.float32), 1.0 if done else -0.01, done, False, {}


class Target(gym.Env):
    """A continuous action: reward -|action - 0.5|, episodes of 10 steps."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.t = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), -abs(float(action[0]) - 0.5), False, self.t >= 10, {}


gym.register(id="GoRight-v0", entry_point=GoRight, max_episode_steps=50)
gym.register(id="Target-v0", entry_point=Target)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "envs.py").write_text(textwrap.dedent(ENVS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_train_eval_and_export_on_a_module_registered_env(user_package, tmp_path, capsys):
    env_id = f"{PACKAGE}.envs:GoRight-v0"
    code = cli.main(["train", "--env-id", env_id, "--total-timesteps", "1024", "--num-envs", "4", "--num-steps", "64",
                     "--run-dir", str(tmp_path / "runs"), "--run-name", "go", "--log-every", "1000"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "runs" / "go"
    config = json.loads((run / "config.json").read_text())
    assert config["env_id"] == env_id and config["preset"] == "classic"
    assert summary["global_step"] == 1024 and summary["episodes"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["episodic_return"] is None or r["episodic_return"] <= 1.0 for r in records)
    result = evaluate(str(run), episodes=2)
    assert result["env_id"] == env_id and result["episodes"] == 2
    assert cli.main(["export", str(run), "--format", "torchscript"]) == 0


def test_a_continuous_user_env_takes_the_continuous_family(user_package):
    assert env_family(f"{PACKAGE}.envs:Target-v0") == "mujoco"
    assert env_family(f"{PACKAGE}.envs:GoRight-v0") == "classic"


def test_bad_module_or_id_is_named(user_package, tmp_path, capsys):
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        env_family("no_such_module_xyz:Env-v0")
    with pytest.raises(ValueError, match="registered no gymnasium task 'Missing-v0'"):
        env_family(f"{PACKAGE}.envs:Missing-v0")
    assert cli.main(["train", "--env-id", "no_such_module_xyz:Env-v0", "--run-dir", str(tmp_path)]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_the_console_script_imports_a_module_in_the_working_directory(tmp_path):
    # `fastppo` as installed (a console script: its own folder, not the working directory, starts
    # sys.path), run where the user's package sits, as the docs' MODULE:ID examples are.
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("fastppo")
    if not script.exists():
        pytest.skip("no fastppo console script beside this Python")
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "envs.py").write_text(textwrap.dedent(ENVS))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "train", "--env-id", f"{PACKAGE}.envs:GoRight-v0", "--total-timesteps", "256",
                           "--num-envs", "2", "--num-steps", "64", "--run-dir", "runs", "--run-name", "go"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "go" / "config.json").read_text())["env_id"] == f"{PACKAGE}.envs:GoRight-v0"
