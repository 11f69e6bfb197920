"""``fastppo eval``: the saved policy run greedily with its frozen normalization statistics (a
recurrent policy with its state carried through each episode, a masked one among the legal actions
its environments give)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

from .checkpoint import CheckpointError, load_checkpoint
from .config import Args, action_masks_on
from .envs import action_mask_source, env_family, episode_bookkeeping, make_env, read_action_masks
from .envstep import EnvStepBoundary
from .recurrent import make_agent
from .rollout import normalization


def evaluate(path: str, episodes: int = 10, device: str = "cpu", seed: int = 12345, video: Optional[str] = None,
             video_max_steps: Optional[int] = None) -> dict:
    """Runs the saved policy (greedy for discrete actions, the mean for continuous ones, squashed
    into the bounds under ``--squash tanh``) with the saved normalization statistics, frozen, until
    ``episodes`` episodes end; returns their mean and std return. A recurrent policy's state follows
    each episode from zeros at its start. A run trained with action masks picks the most probable
    legal action, the masks read from the environments as in training.

    Args:
        path: a run directory or its checkpoint.pt
        episodes: episodes to run
        device: cpu or cuda
        seed: seed of the evaluation environments
        video: also write one episode on the gymnasium task (rendered, same policy and frozen
            statistics) to this MP4 file (needs fastppo[video]; see fastppo.video)
        video_max_steps: end the video's episode after this many steps (unset: when it ends)
    """
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if video_max_steps is not None and video_max_steps < 1:
        raise ValueError(f"--video-max-steps must be >= 1, got {video_max_steps}")
    state = load_checkpoint(Path(path))
    args = dataclasses.replace(Args(**state["args"]), seed=seed, num_envs=min(episodes, 8))
    family = env_family(args.env_id)
    envs = make_env(args, family)
    obs_shape = envs.observation_space.shape
    agent = make_agent(args, obs_shape, envs.action_space, family).to(device)
    agent.load_state_dict(state["model"])
    agent.eval()
    head = agent.head
    recurrent = getattr(agent, "recurrent", False)
    source = action_mask_source(envs)
    if not action_masks_on(getattr(args, "action_masks", None) or "auto", head, source, args.env_id):
        source = None
    boundary = EnvStepBoundary(args.num_envs, obs_shape, normalize_obs=normalization(args, family)[0], gamma=args.gamma)
    saved = state["boundary"] if "boundary" in state else state["ranks"][0]["boundary"]  # torchrun: rank 0's
    for name in ("obs_count", "obs_mean", "obs_m2"):
        getattr(boundary, name)[...] = saved[name]
    obs = np.zeros((args.num_envs,) + obs_shape, np.uint8 if family == "atari" else np.float32)
    scratch = [np.zeros(args.num_envs, np.float32)] + [np.zeros(args.num_envs, np.bool_) for _ in range(3)]
    raw_obs, info = envs.reset()
    boundary.prime(raw_obs, obs, update_stats=False)
    returns = []

    def legal_actions(info):  # bool [num_envs, A] on the device, or None
        if source is None:
            return None
        return torch.from_numpy(read_action_masks(envs, source, info, args.num_envs, head.n_out)).to(device)

    mask = legal_actions(info)
    if recurrent:  # the state of each environment's episode; reset where an observation starts one
        hidden, start = agent.initial_state(args.num_envs, device), np.ones(args.num_envs, np.bool_)
    while len(returns) < episodes:
        with torch.no_grad():
            if recurrent:
                out, _, hidden = agent.step(torch.from_numpy(obs).to(device), hidden, torch.from_numpy(start).to(device))
            else:
                out = agent.actor(agent.features(torch.from_numpy(obs).to(device)))
            action = head.to_env(head.greedy(out, mask))
        raw_obs, reward, term, trunc, info = envs.step(action)
        mask = legal_actions(info)
        finished = boundary.step(raw_obs, reward, term, trunc, obs, *scratch, update_stats=False,
                                 **episode_bookkeeping(family, term, trunc, info))
        returns.extend(r for r, _ in finished)
        if recurrent:
            start = ~scratch[3]  # after a dummy reset step (not real), the observation starts an episode
    envs.close()
    returns = np.array(returns[:episodes])
    result = dict(env_id=args.env_id, episodes=int(returns.size), mean_return=float(returns.mean()),
                  std_return=float(returns.std()), checkpoint_step=state["global_step"])
    if video is not None:
        from .video import record_trained_video

        result["video"] = record_trained_video(path, video, device, seed, video_max_steps)
    return result


def eval_main(argv=None) -> int:
    """``fastppo eval RUN_DIR --episodes N``: the flags are :func:`evaluate`'s arguments."""
    try:
        result = tyro.cli(evaluate, args=argv, prog="fastppo eval", description="Evaluate a saved policy.",
                          config=(tyro.conf.PositionalRequiredArgs, tyro.conf.PositionalMetavarFromFieldName))
    except (ValueError, CheckpointError) as err:
        print(f"fastppo eval: error: {err}", file=sys.stderr)
        return 2
    print(f"{result['env_id']}: {result['mean_return']:.2f} +- {result['std_return']:.2f} over {result['episodes']} episodes")
    print(json.dumps(result))
    return 0
