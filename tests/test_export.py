"""fastppo export: the ONNX and TorchScript files give the trained policy's actions (the greedy
action exactly, the clipped mean action to 1e-5) on 1000 observations, with the observation
normalization inside them, and ONNX runs under onnxruntime in a process without fastppo or torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

pytest.importorskip("envpool")

from fastppo import cli  # noqa: E402
from fastppo import train as T  # noqa: E402
from fastppo.agent import Agent  # noqa: E402
from fastppo.checkpoint import load_checkpoint  # noqa: E402
from fastppo.envs import env_family, make_env  # noqa: E402
from fastppo.envstep import EnvStepBoundary  # noqa: E402
from fastppo.export import export_policy  # noqa: E402

N = 1000


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    T.train(T.Args(env_id="CartPole-v1", total_timesteps=512, update_epochs=2, run_dir=str(root), run_name="discrete",
                   log_every=1000))
    # Pendulum: a Box action (the mujoco preset: observations normalized by their running statistics)
    T.train(T.Args(env_id="Pendulum-v1", total_timesteps=256, num_steps=128, num_envs=2, num_minibatches=1,
                   update_epochs=2, run_dir=str(root), run_name="continuous", log_every=1000))
    return root


def trained_actions(run_dir, obs: np.ndarray) -> np.ndarray:
    """The trained policy's deterministic actions as fastppo eval computes them: the compiled env step's
    normalization with the saved statistics, frozen, then the agent's actor (argmax, or the mean clipped)."""
    state = load_checkpoint(run_dir)
    args = dataclasses.replace(T.Args(**state["args"]), num_envs=1)
    family = env_family(args.env_id)
    envs = make_env(args, family)
    space = envs.action_space
    envs.close()
    agent = Agent(obs.shape[1:], space, family)
    agent.load_state_dict(state["model"])
    boundary = EnvStepBoundary(len(obs), obs.shape[1:], normalize_obs=bool(args.normalize_obs)
                               if getattr(args, "normalize_obs", None) is not None else family == "mujoco")
    for name in ("obs_count", "obs_mean", "obs_m2"):
        getattr(boundary, name)[...] = state["boundary"][name]
    normalized = np.zeros(obs.shape, np.float32)
    boundary.prime(obs, normalized, update_stats=False)
    with torch.no_grad():
        out = agent.actor(agent.features(torch.from_numpy(normalized))).numpy()
    return np.clip(out, space.low, space.high) if len(space.shape) else out.argmax(-1)


def observations(run_dir, seed=0):
    config = json.loads((run_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    if config["env_id"] == "CartPole-v1":
        return (rng.normal(size=(N, 4)) * [1.0, 1.0, 0.1, 1.0]).astype(np.float32)
    angle = rng.uniform(-np.pi, np.pi, N)
    return np.stack([np.cos(angle), np.sin(angle), rng.uniform(-8, 8, N)], 1).astype(np.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")  # torch 2.9 on
@pytest.mark.parametrize("name", ["discrete", "continuous"])
def test_exported_policies_give_the_trained_actions(runs, tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    run_dir = runs / name
    obs = observations(run_dir)
    expected = trained_actions(run_dir, obs)
    state = load_checkpoint(run_dir)
    if name == "continuous":
        assert state["boundary"]["obs_count"][0] > 0  # the statistics the export must fold in are not trivial
        assert np.abs(expected).max() > 0
    onnx_path = export_policy(run_dir, tmp_path / "p.onnx", "onnx")
    got_onnx = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"obs": obs})[0]
    script = torch.jit.load(str(export_policy(run_dir, tmp_path / "p.pt", "torchscript")))
    with torch.no_grad():
        got_script = script(torch.from_numpy(obs)).numpy()
    if name == "discrete":
        assert got_onnx.dtype == np.int64 and got_onnx.shape == (N,)
        assert len(set(expected.tolist())) == 2  # both actions occur: the comparison can fail
        np.testing.assert_array_equal(got_onnx, expected)
        np.testing.assert_array_equal(got_script, expected)
    else:
        assert got_onnx.shape == (N, 1) and got_onnx.dtype == np.float32
        np.testing.assert_allclose(got_onnx, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got_script, expected, rtol=0, atol=1e-5)
    # batch of one: the batch axis is dynamic
    one = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"obs": obs[:1]})[0]
    np.testing.assert_array_equal(one, got_onnx[:1])


def test_onnx_runs_without_fastppo_or_torch(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "policy.onnx"
    assert cli.main(["export", str(runs / "discrete"), "--format", "onnx", "--out", str(out)]) == 0
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1])\n"
            "a = s.run(None, {'obs': np.zeros((3, 4), np.float32)})[0]\n"
            "assert 'torch' not in sys.modules and 'fastppo' not in sys.modules\n"
            "print(a.tolist())")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == trained_actions(runs / "discrete", np.zeros((3, 4), np.float32)).tolist()


def test_export_command_defaults_and_errors(runs, tmp_path, capsys):
    assert cli.main(["export", str(runs / "discrete"), "--format", "torchscript"]) == 0
    assert (runs / "discrete" / "policy.pt").exists()
    assert cli.main(["export", str(tmp_path / "nothing"), "--format", "torchscript"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--format must be onnx or torchscript"):
        export_policy(runs / "discrete", tmp_path / "x", "tflite")
