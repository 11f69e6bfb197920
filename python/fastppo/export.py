"""``fastppo export``: a trained policy as a file that runs without fastppo (ONNX or TorchScript).

The exported graph is the deterministic policy of ``fastppo eval``: the saved observation
normalization, frozen, then the actor, then the greedy action (discrete; of each component for
MultiDiscrete; among the legal actions of a second input ``action_mask`` for a run trained with
action masks) or the mean action clipped to the action space's bounds (continuous; squashed into
them under ``--squash tanh``). ``DeterministicPolicy`` is that graph as a torch module;
``fastppo eval --video`` and ``fastppo train --capture-video`` run it too.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["DeterministicPolicy", "ExportArgs", "TrainedPolicy", "export_policy", "load_policy"]

OBS_CLIP, OBS_EPS = 10.0, 1e-8  # EnvStepBoundary's defaults: z = clip((x - mean) / sqrt(var + eps), -10, 10)


class DeterministicPolicy(nn.Module):
    """The trained agent's deterministic action from a raw observation.

    ``forward(obs, action_mask=None)``: ``obs`` ``[B, *obs_shape]`` as the environment gives it
    (float32 vectors, or uint8 ``[B, 4, 84, 84]`` Atari frames) -> ``[B]`` int64 (argmax of the
    logits, plus the space's ``start``), ``[B, K]`` int64 (MultiDiscrete: each component's argmax)
    or ``[B, D]`` float32 (the Gaussian's mean clipped to ``[low, high]``, or with the agent's
    ``squash="tanh"`` head ``low + (tanh(mean) + 1) * (high - low) / 2``). ``action_mask``: None, or
    bool ``[B, A]`` (``A`` = n or sum(nvec)), the legal actions the argmax is taken among
    (``masked``: the policy was trained with masks). With ``obs_mean`` / ``obs_var`` (float64
    ``[obs_dim]``, the MuJoCo preset's running statistics) the observations are first normalized
    as in training, ``clip((x - mean) / sqrt(var + 1e-8), -10, 10)``, with the statistics frozen.
    """

    def __init__(self, agent: nn.Module, obs_mean: Optional[np.ndarray] = None, obs_var: Optional[np.ndarray] = None,
                 low: Optional[np.ndarray] = None, high: Optional[np.ndarray] = None, masked: bool = False):
        super().__init__()
        self.trunk, self.actor, self.scale = agent.trunk, agent.actor, float(agent.scale)
        self.continuous = bool(agent.continuous)
        head = getattr(agent, "head", None)  # a module of CleanRL's shape without one: categorical or Gaussian
        self.kind = head.kind if head is not None else "normal" if self.continuous else "categorical"
        self.nvec = None if head is None else head.nvec
        self.masked = bool(masked) and self.kind in ("categorical", "multi_categorical")
        start = None if head is None or head.start is None or not any(head.start) else head.start
        self.has_start = start is not None
        if self.has_start:  # gymnasium's start of the discrete actions
            self.register_buffer("start", torch.as_tensor(start if self.nvec else start[0], dtype=torch.int64))
        self.normalize = obs_mean is not None
        if self.normalize:
            self.register_buffer("obs_mean", torch.as_tensor(np.asarray(obs_mean, np.float64), dtype=torch.float32))
            inv_std = 1.0 / np.sqrt(np.asarray(obs_var, np.float64) + OBS_EPS)
            self.register_buffer("obs_inv_std", torch.as_tensor(inv_std, dtype=torch.float32))
        if self.kind == "tanh_normal":
            low, high = head.low, head.high
        self.clip_action = self.continuous and low is not None and bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
        if self.clip_action:
            self.register_buffer("low", torch.as_tensor(np.asarray(low), dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(np.asarray(high), dtype=torch.float32))
        if self.kind == "tanh_normal":
            half = 0.5 * (np.asarray(high, np.float64) - np.asarray(low, np.float64))
            self.register_buffer("half_range", torch.as_tensor(half, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = obs.float()
        if self.normalize:
            shape = x.shape
            x = ((x.reshape(shape[0], -1) - self.obs_mean) * self.obs_inv_std).clamp(-OBS_CLIP, OBS_CLIP).reshape(shape)
        if self.scale != 1.0:
            x = x * self.scale
        out = self.actor(self.trunk(x))
        if self.continuous:
            if self.kind == "tanh_normal":
                out = self.low + (torch.tanh(out) + 1.0) * self.half_range  # then clipped: rounding stays inside
            return torch.maximum(torch.minimum(out, self.high), self.low) if self.clip_action else out
        if action_mask is not None:
            out = out.masked_fill(~action_mask, -math.inf)
        if self.kind == "multi_categorical":
            action = torch.stack([part.argmax(-1) for part in out.split(list(self.nvec), -1)], -1)
        else:
            action = out.argmax(-1)
        return action + self.start if self.has_start else action


class TrainedPolicy(NamedTuple):
    """What :func:`load_policy` gives: the policy, the run's settings (``fastppo.config.Args``), its
    env family, the observation shape and action space, and the checkpoint's step."""

    policy: DeterministicPolicy
    args: object
    family: str
    obs_shape: tuple
    action_space: object
    global_step: int
    masked: bool = False
    """the policy takes the legal actions (``action_mask``, bool ``[B, A]``) as a second input"""


def saved_obs_statistics(state: dict):
    """``(mean, var)`` float64 ``[obs_dim]`` of a train checkpoint's observation normalization (rank 0's
    under torchrun); the variance is 1 before any observation was seen, as in ``EnvStepBoundary``."""
    saved = state["boundary"] if "boundary" in state else state["ranks"][0]["boundary"]
    count = float(np.asarray(saved["obs_count"]).reshape(-1)[0])
    mean, m2 = np.asarray(saved["obs_mean"], np.float64), np.asarray(saved["obs_m2"], np.float64)
    return mean, (m2 / count if count > 0 else np.ones_like(m2))


def policy_for(agent: nn.Module, action_space, obs_stats=None, masked: bool = False) -> DeterministicPolicy:
    """:class:`DeterministicPolicy` over ``agent``'s own modules (no copy); ``obs_stats``: ``(mean,
    var)`` of the observation normalization, None for a run without it; ``masked``: it takes the
    legal actions as a second input."""
    mean, var = (None, None) if obs_stats is None else obs_stats
    continuous = bool(agent.continuous)
    return DeterministicPolicy(agent, mean, var, action_space.low if continuous else None,
                               action_space.high if continuous else None, masked)


def normalizes_observations(args, family: str) -> bool:
    """Whether a run of ``args`` normalized its observations (the setting, or the MuJoCo family's rule
    for runs saved before there was one)."""
    normalize = getattr(args, "normalize_obs", None)
    return family == "mujoco" if normalize is None else bool(normalize)


def check_feed_forward(args, what: str) -> None:
    """A recurrent policy has no single-observation action: ``what`` (the command) is refused for it."""
    recurrent = getattr(args, "recurrent", None)
    if recurrent not in (None, "none"):
        raise ValueError(f"{what} runs feed-forward policies; this run's policy is recurrent (--recurrent {recurrent})")


def load_policy(path, device: str = "cpu") -> TrainedPolicy:
    """The deterministic policy saved in a run folder (or its checkpoint.pt), on ``device``, in eval mode."""
    from fastppo.agent import Agent, Kernels, MlpShape
    from fastppo.checkpoint import load_checkpoint
    from fastppo.config import Args, action_masks_on
    from fastppo.envs import action_mask_source, env_family, make_env

    state = load_checkpoint(Path(path))
    args = dataclasses.replace(Args(**state["args"]), num_envs=1, async_batch_size=None)
    check_feed_forward(args, "a deterministic policy")
    family = env_family(args.env_id)
    envs = make_env(args, family)
    obs_shape, action_space = tuple(envs.observation_space.shape), copy.deepcopy(envs.action_space)
    source = action_mask_source(envs)
    envs.close()
    agent = Agent(obs_shape, action_space, family, Kernels(channels_last=False), getattr(args, "squash", None) or "none",
                  MlpShape.of(args))
    agent.load_state_dict(state["model"])
    masked = action_masks_on(getattr(args, "action_masks", None) or "auto", agent.head, source, args.env_id)
    stats = saved_obs_statistics(state) if normalizes_observations(args, family) else None
    policy = policy_for(agent, action_space, stats, masked).to(device).eval()
    return TrainedPolicy(policy, args, family, obs_shape, action_space, int(state["global_step"]), masked)


def export_policy(path, out, format: str = "onnx") -> Path:
    """Writes the deterministic policy of the run at ``path`` to ``out``: ``onnx`` (input ``obs``
    ``[batch, *obs_shape]``, output ``action``; opset 17, a dynamic batch) or ``torchscript``
    (``torch.jit.load(out)(obs)``). A run trained with action masks takes them as a second input,
    ``action_mask`` bool ``[batch, A]`` (``torch.jit.load(out)(obs, action_mask)``). Returns ``out``."""
    if format not in ("onnx", "torchscript"):
        raise ValueError(f"--format must be onnx or torchscript, got {format!r}")
    trained = load_policy(path)
    policy = trained.policy
    example = (torch.zeros((2,) + trained.obs_shape, dtype=torch.uint8 if trained.family == "atari" else torch.float32),)
    names = ["obs"]
    if trained.masked:
        width = sum(policy.nvec) if policy.nvec else int(trained.action_space.n)
        example += (torch.ones((2, width), dtype=torch.bool),)
        names.append("action_mask")
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    # torch (2.9 on) warns that TorchScript is deprecated in favour of torch.export, and that the
    # TorchScript-based ONNX exporter is no longer the default; for these small graphs it is seconds
    # faster than torch.export's and needs no onnxscript. The files load in torch and onnxruntime alike.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(policy, example), str(out))
        else:
            try:
                import onnx  # noqa: F401  (torch's exporter writes through it)
            except ImportError as err:
                raise ValueError("--format onnx needs the onnx package: pip install 'fastppo[export]'") from err
            torch.onnx.export(policy, example, str(out), input_names=names, output_names=["action"],
                              dynamic_axes={**{name: {0: "batch"} for name in names}, "action": {0: "batch"}},
                              opset_version=17, dynamo=False)
    return out


@dataclass
class ExportArgs:
    run_dir: str
    """a run folder (or its checkpoint.pt)"""
    format: Literal["onnx", "torchscript"] = "onnx"
    """onnx (run it with onnxruntime) or torchscript (torch.jit.load)"""
    out: Optional[str] = None
    """the file to write (unset: policy.onnx or policy.pt in the run folder)"""


def export_main(argv=None) -> int:
    """``fastppo export RUN_DIR --format onnx|torchscript --out FILE``."""
    import tyro

    from fastppo.checkpoint import CheckpointError

    args = tyro.cli(ExportArgs, args=argv, prog="fastppo export",
                    description="Export a trained policy (deterministic action, observation normalization folded in) "
                                "to ONNX or TorchScript: runs without fastppo.",
                    config=(tyro.conf.PositionalRequiredArgs, tyro.conf.PositionalMetavarFromFieldName,
                            tyro.conf.DisallowNone))
    folder = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    out = args.out or str(folder / ("policy.onnx" if args.format == "onnx" else "policy.pt"))
    try:
        written = export_policy(args.run_dir, out, args.format)
    except (ValueError, CheckpointError) as err:
        print(f"fastppo export: error: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0
