"""Videos of a policy: a full 500-step CartPole episode, 1000 steps of HalfCheetah rendered headless,
Atari frames rebuilt as EnvPool's observations, ``fastppo eval --video`` on a saved run, and a
renderer that fails named in the error."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("gymnasium")
pytest.importorskip("imageio")

from fastppo.agent import Agent  # noqa: E402
from fastppo.export import DeterministicPolicy, policy_for  # noqa: E402
from fastppo.video import _frame, record_video  # noqa: E402


class _Linear(nn.Module):
    """A policy without a trunk: logits [0, w . obs] (the greedy action: 1 when w . obs > 0)."""

    def __init__(self, w):
        super().__init__()
        self.trunk, self.scale, self.continuous = nn.Identity(), 1.0, False
        self.actor = nn.Linear(len(w), 2)
        with torch.no_grad():
            self.actor.weight.zero_()
            self.actor.bias.zero_()
            self.actor.weight[1] = torch.tensor(w)


def frames_of(path):
    """``({"fps", "size"}, frame count)`` of an MP4, read by ffmpeg in a subprocess (imageio's
    readers leave the ffmpeg process's pipes open, which the warnings-as-errors setting fails)."""
    import re
    import subprocess

    import imageio_ffmpeg

    count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr
    stream = next(line for line in info.splitlines() if "Video:" in line)
    w, h = map(int, re.search(r", (\d+)x(\d+)", stream).groups())
    fps = float(re.search(r"([\d.]+) fps", stream).group(1))
    return dict(fps=fps, size=(w, h)), count


def test_cartpole_video_of_a_full_500_step_episode(tmp_path):
    pytest.importorskip("pygame")
    policy = DeterministicPolicy(_Linear([0.1, 0.5, 1.0, 1.0]))  # balances CartPole from seed 0's start
    video = record_video(policy, "CartPole-v1", "classic", tmp_path / "cartpole.mp4", seed=0)
    assert video["length"] == 500 and video["episode_return"] == 500.0 and video["frames"] == 501
    meta, count = frames_of(tmp_path / "cartpole.mp4")
    assert count == 501 and meta["fps"] == 50 and meta["size"] == (600, 400)


def test_halfcheetah_video_of_1000_steps_headless(tmp_path):
    pytest.importorskip("mujoco")
    import gymnasium as gym

    space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
    torch.manual_seed(0)
    agent = Agent((17,), space, "mujoco")
    policy = policy_for(agent, space, (np.zeros(17), np.ones(17)))
    try:
        video = record_video(policy, "HalfCheetah-v5", "mujoco", tmp_path / "cheetah.mp4", width=128, height=96)
    except ValueError as err:  # no EGL / OSMesa here: the error says what to install
        assert "MUJOCO_GL" in str(err)
        pytest.skip(f"MuJoCo cannot render here: {err}")
    assert video["length"] == 1000 and video["frames"] == 1001
    meta, count = frames_of(tmp_path / "cheetah.mp4")
    assert count == 1001 and meta["size"] == (128, 96)


def test_atari_frames_are_envpool_observations(tmp_path):
    pytest.importorskip("ale_py")
    import gymnasium as gym

    from fastppo.video import AtariFrames

    env = AtariFrames("Pong-v5", seed=0)
    obs, _ = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    envpool = pytest.importorskip("envpool")
    spec = envpool.make_spec("Pong-v5")
    assert spec.observation_space.shape == obs.shape and spec.action_space.n == env.action_space.n
    env.close()
    torch.manual_seed(0)
    agent = Agent((4, 84, 84), gym.spaces.Discrete(6), "atari")
    video = record_video(policy_for(agent, gym.spaces.Discrete(6)), "Pong-v5", "atari", tmp_path / "pong.mp4",
                         max_steps=20)
    assert video["length"] == 20
    meta, count = frames_of(tmp_path / "pong.mp4")
    assert count == 21 and meta["fps"] == 15 and meta["size"] == (160, 210)


def test_eval_writes_a_video_of_the_saved_policy(tmp_path):
    pytest.importorskip("envpool")
    pytest.importorskip("pygame")
    from fastppo import cli
    from fastppo import train as T

    T.train(T.Args(total_timesteps=512, update_epochs=1, run_dir=str(tmp_path), run_name="run", log_every=1000))
    out = tmp_path / "eval.mp4"
    assert cli.main(["eval", str(tmp_path / "run"), "--episodes", "1", "--video", str(out)]) == 0
    _, count = frames_of(out)
    assert count >= 9  # an episode of CartPole lasts at least 9 steps


def test_a_renderer_that_fails_is_named():
    class Broken:
        def render(self):
            raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    with pytest.raises(ValueError, match="HalfCheetah-v5 cannot render here: AttributeError"):
        _frame(Broken(), "HalfCheetah-v5")

    class Nothing:
        def render(self):
            return None

    with pytest.raises(ValueError, match="rendered no frame"):
        _frame(Nothing(), "X-v0")


def test_bad_video_max_steps_names_the_flag(tmp_path):
    from fastppo.config import Args, resolve
    from fastppo.evaluate import evaluate

    with pytest.raises(ValueError, match="--video-max-steps must be >= 1, got 0"):
        evaluate(str(tmp_path), video=str(tmp_path / "v.mp4"), video_max_steps=0)
    with pytest.raises(ValueError, match="--video-max-steps must be > 0, got -3"):
        resolve(Args(env_id="CartPole-v1", video_max_steps=-3))
