"""Videos of a policy: one episode on the gymnasium version of the task (EnvPool does not render),
``render_mode="rgb_array"``, written as MP4 with imageio's ffmpeg (``pip install 'fastppo[video]'``).

Classic control renders with pygame (``gymnasium[classic-control]``), MuJoCo headless through EGL
(``MUJOCO_GL=egl``, the default set here when unset) or OSMesa (``MUJOCO_GL=osmesa``), Atari with
ale-py: EnvPool's Atari observations (grayscale 84x84, 4 frames stacked, frame skip 4 with the max
of the last two frames, up to 30 no-ops and FIRE at reset, no sticky actions) are rebuilt from ALE's
screen so that the policy sees what it was trained on. Used by ``fastppo eval --video`` and
``fastppo train --capture-video``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

__all__ = ["make_render_env", "record_trained_video", "record_video", "write_video"]


def _gymnasium():
    import gymnasium as gym

    return gym


class AtariFrames:
    """An ALE game stepped like EnvPool's ``<Game>-v5``: observation uint8 ``[4, 84, 84]``, one step
    = 4 frames (reward summed, the observation the max of the last two screens), up to 30 random
    no-ops then FIRE at reset, and ``render()`` the game's RGB screen. Not a training environment:
    only what a video needs."""

    metadata = {"render_fps": 15}  # 60 frames per second, 4 per step

    def __init__(self, env_id: str, seed: int = 0, noop_max: int = 30, frame_skip: int = 4, stack: int = 4):
        gym = _gymnasium()
        try:
            import ale_py
        except ImportError as err:
            raise ValueError(f"a video of {env_id} needs ale-py: pip install ale-py") from err
        gym.register_envs(ale_py)
        game = env_id.split("-")[0]
        self.env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=False,
                            obs_type="grayscale", render_mode="rgb_array")
        self.action_space = self.env.action_space
        self.noop_max, self.frame_skip, self.stack = noop_max, frame_skip, stack
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        meanings = self.env.unwrapped.get_action_meanings()
        self.fire = meanings.index("FIRE") if "FIRE" in meanings else None
        self.frames: List[np.ndarray] = []

    @staticmethod
    def _resize(screen: np.ndarray) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.fromarray(screen).resize((84, 84), Image.BOX), np.uint8)

    def _push(self, screen: np.ndarray) -> None:
        self.frames = (self.frames + [self._resize(screen)])[-self.stack:]

    def reset(self, seed: Optional[int] = None):
        screen, info = self.env.reset(seed=self.seed if seed is None else seed)
        for _ in range(int(self.rng.integers(0, self.noop_max + 1))):
            screen, _, term, trunc, info = self.env.step(0)
            if term or trunc:
                screen, info = self.env.reset()
        if self.fire is not None:
            screen, _, _, _, info = self.env.step(self.fire)
        self.frames = [self._resize(screen)] * self.stack
        return np.stack(self.frames), info

    def step(self, action):
        total, last = 0.0, []
        term = trunc = False
        info = {}
        for _ in range(self.frame_skip):
            screen, reward, term, trunc, info = self.env.step(int(action))
            total += float(reward)
            last = (last + [screen])[-2:]
            if term or trunc:
                break
        self._push(np.maximum(last[0], last[-1]))
        return np.stack(self.frames), total, term, trunc, info

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()


def make_render_env(env_id: str, family: str, seed: int = 0, width: Optional[int] = None, height: Optional[int] = None):
    """The gymnasium environment of ``env_id`` that renders RGB frames (``render()``: uint8 ``[H, W, 3]``).
    ``width`` / ``height``: the frame size of MuJoCo tasks (their default 480 x 480)."""
    gym = _gymnasium()
    if family == "atari":
        return AtariFrames(env_id, seed)
    kwargs = {}
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame (classic control) draws off screen: no display
    if family == "mujoco":
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless; read when mujoco's renderer first loads
        kwargs = {k: v for k, v in (("width", width), ("height", height)) if v is not None}
    try:
        try:
            env = gym.make(env_id, render_mode="rgb_array", **kwargs)
        except TypeError:  # a task whose constructor takes no frame size
            env = gym.make(env_id, render_mode="rgb_array")
    except gym.error.DependencyNotInstalled as err:
        raise ValueError(f"{env_id} cannot render here: {err}") from err
    model = getattr(env.unwrapped, "model", None)
    if family == "mujoco" and hasattr(model, "light_castshadow"):
        # No shadows, no multisampling: software OpenGL (Mesa's llvmpipe behind EGL or OSMesa, what a
        # headless machine has) then draws a frame in about 10 ms instead of 200 ms.
        model.light_castshadow[:] = 0
        model.vis.quality.offsamples = 0
    return env


def _frame(env, env_id: str) -> np.ndarray:
    try:
        frame = env.render()
    except Exception as err:  # the GL libraries of MuJoCo's renderer fail as AttributeError, ImportError, ...
        backend = os.environ.get("MUJOCO_GL")
        hint = (f" (MUJOCO_GL={backend}: MuJoCo renders headless with EGL, Debian's libegl1 + libegl-mesa0, or with "
                "OSMesa, libosmesa6 and MUJOCO_GL=osmesa)" if backend is not None else "")
        raise ValueError(f"{env_id} cannot render here: {type(err).__name__}: {err}{hint}") from err
    if frame is None:
        raise ValueError(f"{env_id} rendered no frame: its render_mode='rgb_array' is not supported")
    return np.asarray(frame, np.uint8)


def write_video(frames, path, fps: float) -> Path:
    """Writes RGB frames (uint8 ``[H, W, 3]`` each, even sizes kept, odd ones padded by a pixel) as an
    H.264 MP4 at ``fps`` frames per second. Returns ``path``."""
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise ValueError("writing a video needs imageio and imageio-ffmpeg: pip install 'fastppo[video]'") from err
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1, quality=6,
                            ffmpeg_log_level="error", pixelformat="yuv420p") as writer:
        for frame in frames:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:  # yuv420p needs even sizes
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            writer.append_data(frame)
    return path


def record_video(policy, env_id: str, family: str, path, seed: int = 0, max_steps: Optional[int] = None,
                 width: Optional[int] = None, height: Optional[int] = None) -> dict:
    """One episode of ``policy`` (a :class:`fastppo.export.DeterministicPolicy`, its normalization
    frozen) on the rendering env of ``env_id``, written to the MP4 ``path``; ``max_steps`` ends it
    early. A ``masked`` policy picks among the legal actions the environment gives (its
    ``info["action_mask"]`` or ``action_masks()``). Returns ``dict(path, episode_return, length, frames)``."""
    from fastppo.envs import single_env_mask_source

    env = make_render_env(env_id, family, seed, width, height)
    fps = float(env.metadata.get("render_fps") or 30)
    try:
        source = single_env_mask_source(env, seed) if getattr(policy, "masked", False) else None

        def legal_actions(info):  # bool [1, A], or None
            if source is None:
                return None
            mask = info["action_mask"] if source == "info" else env.get_wrapper_attr("action_masks")()
            return torch.as_tensor(np.asarray(mask).reshape(1, -1) != 0, device=device)

        device = next(policy.parameters()).device
        obs, info = env.reset(seed=seed)
        frames = [_frame(env, env_id)]
        total, length, done = 0.0, 0, False
        while not done and (max_steps is None or length < max_steps):
            with torch.no_grad():
                batch = torch.from_numpy(np.asarray(obs)[None].copy()).to(device)
                mask = legal_actions(info)
                action = (policy(batch) if mask is None else policy(batch, mask))[0].cpu().numpy()
            action = action if action.ndim else int(action)
            obs, reward, term, trunc, info = env.step(action)
            total, length, done = total + float(reward), length + 1, bool(term or trunc)
            frames.append(_frame(env, env_id))
    finally:
        env.close()
    write_video(frames, path, fps)
    return dict(path=str(path), episode_return=total, length=length, frames=len(frames))


def record_trained_video(path, out, device: str = "cpu", seed: int = 0, max_steps: Optional[int] = None) -> dict:
    """:func:`record_video` of the policy saved in the run folder (or checkpoint) ``path`` into ``out``."""
    from fastppo.export import load_policy

    trained = load_policy(path, device)
    return record_video(trained.policy, trained.args.env_id, trained.family, out, seed=seed, max_steps=max_steps)
