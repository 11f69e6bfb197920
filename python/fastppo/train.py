"""PPO on EnvPool batched environments, shaped like CleanRL's ppo.py.

The loop reads top to bottom: an ``Args`` dataclass (a docstring line under every field becomes
``--help``), ``make_env``, an ``Agent`` with ``get_value`` / ``get_action_and_value``, then
rollout -> GAE -> epochs of shuffled minibatches. fastppo's kernels replace lines of that loop
(advantages, the clipped loss, the policy heads); they do not hide it.

EnvPool resets an environment on the step *after* it ends: that step ignores the action and
returns the reset observation with reward 0. Those steps are stored like the others and masked out
of the loss, and because the observation stored after a truncated step is the final observation,
``fastppo.gae`` bootstraps truncations exactly (``terminated`` apart from ``dones``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import fastppo


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """the EnvPool task id (CartPole-v1, Pong-v5, HalfCheetah-v5, ...)"""
    preset: str = "auto"
    """hyperparameter preset: classic, atari, mujoco, or auto (chosen from the env id)"""
    total_timesteps: Optional[int] = None
    """total environment steps (default: the preset's)"""
    learning_rate: Optional[float] = None
    """Adam learning rate (default: the preset's)"""
    num_envs: Optional[int] = None
    """parallel environments (default: the preset's)"""
    num_steps: Optional[int] = None
    """steps per environment per rollout (default: the preset's)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch (default: the preset's)"""
    update_epochs: Optional[int] = None
    """epochs over each rollout (default: the preset's)"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: Optional[float] = None
    """surrogate clipping coefficient (default: the preset's)"""
    clip_vloss: bool = True
    """clip the value loss"""
    ent_coef: Optional[float] = None
    """entropy bonus coefficient (default: the preset's)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""
    target_kl: Optional[float] = None
    """stop an update's epochs early when approx_kl exceeds this"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    run_dir: str = "runs"
    """directory under which the run's folder (metrics, checkpoints) is made"""
    run_name: Optional[str] = None
    """name of the run's folder (default: env id, seed and time)"""
    checkpoint_every: int = 50
    """write a checkpoint every this many iterations (and at the end)"""
    log_every: int = 1
    """print a progress line every this many iterations"""


PRESETS = {
    # CleanRL ppo.py
    "classic": dict(total_timesteps=500_000, learning_rate=2.5e-4, num_envs=4, num_steps=128,
                    num_minibatches=4, update_epochs=4, clip_coef=0.2, ent_coef=0.01),
    # CleanRL ppo_atari_envpool.py
    "atari": dict(total_timesteps=10_000_000, learning_rate=2.5e-4, num_envs=8, num_steps=128,
                  num_minibatches=4, update_epochs=4, clip_coef=0.1, ent_coef=0.01),
    # CleanRL ppo_continuous_action.py
    "mujoco": dict(total_timesteps=1_000_000, learning_rate=3e-4, num_envs=1, num_steps=2048,
                   num_minibatches=32, update_epochs=10, clip_coef=0.2, ent_coef=0.0),
}


def env_family(env_id: str) -> str:
    import envpool

    if env_id not in envpool.list_all_envs():
        close = [e for e in envpool.list_all_envs() if env_id.split("-")[0].lower() in e.lower()][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"--env-id {env_id!r} is not an EnvPool task{hint}")
    spec = envpool.make_spec(env_id)
    config = spec.config
    if hasattr(config, "episodic_life") and hasattr(config, "reward_clip"):
        return "atari"
    if len(spec.action_space.shape) > 0:
        return "mujoco"
    return "classic"


def resolve(args: Args) -> Args:
    """Fills the preset's values into the fields left at None and checks every value."""
    family = env_family(args.env_id)
    preset = family if args.preset == "auto" else args.preset
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of auto, {', '.join(PRESETS)}; got {args.preset!r}")
    values = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in PRESETS[preset].items()}
    args = dataclasses.replace(args, preset=preset, **values)
    checks = [
        ("total_timesteps", args.total_timesteps > 0, "> 0"), ("num_envs", args.num_envs > 0, "> 0"),
        ("num_steps", args.num_steps > 0, "> 0"), ("learning_rate", args.learning_rate > 0, "> 0"),
        ("num_minibatches", args.num_minibatches > 0, "> 0"), ("update_epochs", args.update_epochs > 0, "> 0"),
        ("clip_coef", args.clip_coef > 0, "> 0"), ("gamma", 0 <= args.gamma <= 1, "in [0, 1]"),
        ("gae_lambda", 0 <= args.gae_lambda <= 1, "in [0, 1]"), ("checkpoint_every", args.checkpoint_every > 0, "> 0"),
        ("log_every", args.log_every > 0, "> 0"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)!r}")
    if (args.num_envs * args.num_steps) % args.num_minibatches:
        raise ValueError(
            f"--num-minibatches ({args.num_minibatches}) must divide num_envs * num_steps "
            f"({args.num_envs} * {args.num_steps})"
        )
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return args


def make_env(args: Args, family: str):
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=args.num_envs, seed=args.seed)
    if family == "atari":
        kwargs.update(episodic_life=True, reward_clip=True)
    with warnings.catch_warnings():  # gymnasium notes that EnvPool's float64 Box bounds become float32
        warnings.filterwarnings("ignore", message=".*precision lowered", category=UserWarning)
        return envpool.make(args.env_id, **kwargs)


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor-critic: MLPs for vector observations (categorical or state-independent Gaussian
    policy), the Nature CNN for Atari frames."""

    def __init__(self, obs_shape, action_space, family: str):
        super().__init__()
        self.continuous = len(action_space.shape) > 0
        n_out = action_space.shape[0] if self.continuous else int(action_space.n)
        if family == "atari":
            self.trunk = nn.Sequential(
                layer_init(nn.Conv2d(obs_shape[0], 32, 8, stride=4)), nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
                layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(),
                layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
            )
            self.actor = layer_init(nn.Linear(512, n_out), std=0.01)
            self.critic = layer_init(nn.Linear(512, 1), std=1)
            self.scale = 1.0 / 255.0
        else:
            n_in = int(np.prod(obs_shape))
            hidden = 64
            self.trunk = nn.Identity()
            self.actor = nn.Sequential(
                layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, n_out), std=0.01),
            )
            self.critic = nn.Sequential(
                layer_init(nn.Linear(n_in, hidden)), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                layer_init(nn.Linear(hidden, 1), std=1.0),
            )
            self.scale = 1.0
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(n_out))

    def features(self, obs):
        return self.trunk(obs.float() * self.scale) if self.scale != 1.0 else self.trunk(obs.float())

    def get_value(self, obs):
        return self.critic(self.features(obs)).squeeze(-1)

    def get_action_and_value(self, obs, action=None):
        h = self.features(obs)
        out = self.actor(h)
        if self.continuous:
            if action is None:
                action = out + self.actor_logstd.exp() * torch.randn_like(out)
            logprob, entropy = fastppo.normal_logprob_entropy(out, self.actor_logstd, action)
        else:
            if action is None:
                action = torch.distributions.Categorical(logits=out).sample()
            logprob, entropy = fastppo.categorical_logprob_entropy(out, action.long())
        return action, logprob, entropy, self.critic(h).squeeze(-1)


class RunningMeanStd:
    """Running mean and variance (float64, Chan et al.'s merge of batch moments)."""

    def __init__(self, shape=()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        batch_mean, batch_var, n = x.mean(0), x.var(0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def state_dict(self):
        return dict(mean=self.mean, var=self.var, count=self.count)

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class Normalizer:
    """MuJoCo preset: observations normalized and clipped to +-10, rewards scaled by the running
    std of the discounted return and clipped to +-10 (CleanRL's wrappers)."""

    def __init__(self, obs_shape, num_envs, gamma, enabled):
        self.enabled, self.gamma = enabled, gamma
        self.obs_rms, self.ret_rms = RunningMeanStd(obs_shape), RunningMeanStd()
        self.returns = np.zeros(num_envs)

    def obs(self, obs, update=True):
        if not self.enabled:
            return obs
        if update:
            self.obs_rms.update(obs)
        return np.clip((obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -10, 10).astype(np.float32)

    def reward(self, reward, done):
        if not self.enabled:
            return reward
        self.returns = self.returns * self.gamma + reward
        self.ret_rms.update(self.returns)
        self.returns[done] = 0.0
        return np.clip(reward / np.sqrt(self.ret_rms.var + 1e-8), -10, 10)

    def state_dict(self):
        return dict(obs_rms=self.obs_rms.state_dict(), ret_rms=self.ret_rms.state_dict(), returns=self.returns)

    def load_state_dict(self, state):
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.ret_rms.load_state_dict(state["ret_rms"])
        self.returns = state["returns"]


class EpisodeTracker:
    """Per-env return and length of the real episodes, across EnvPool's dummy reset steps."""

    def __init__(self, num_envs, window=100):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, np.int64)
        self.recent = deque(maxlen=window)
        self.count = 0

    def step(self, reward, real, episode_over):
        """reward: the raw reward of this step; real: the step is not a dummy reset step;
        episode_over: the episode (as a player sees it) ended at this step."""
        self.returns += np.where(real, reward, 0.0)
        self.lengths += real
        finished = []
        for i in np.flatnonzero(episode_over):
            finished.append((float(self.returns[i]), int(self.lengths[i])))
            self.returns[i], self.lengths[i] = 0.0, 0
        self.recent.extend(finished)
        self.count += len(finished)
        return finished

    def mean_return(self) -> Optional[float]:
        """Mean return of the recent episodes, None before the first one ends."""
        return float(np.mean([r for r, _ in self.recent])) if self.recent else None


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, then renamed: a crash mid-write leaves the last one intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args: Args) -> dict:
    """Runs PPO with ``args`` and returns a summary (steps, seconds, recent mean return, run dir)."""
    args = resolve(args)
    family = env_family(args.env_id)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    run_name = args.run_name or f"{args.env_id}__seed{args.seed}__{int(time.time())}"
    run_dir = Path(args.run_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    envs = make_env(args, family)
    obs_shape = envs.observation_space.shape
    agent = Agent(obs_shape, envs.action_space, family).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    normalizer = Normalizer(obs_shape, args.num_envs, args.gamma, enabled=family == "mujoco")
    episodes = EpisodeTracker(args.num_envs)

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = max(1, args.total_timesteps // batch_size)
    obs_dtype = torch.uint8 if family == "atari" else torch.float32
    action_shape = envs.action_space.shape
    obs_buf = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=obs_dtype, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs) + action_shape, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), dtype=torch.bool, device=device)
    terminated = torch.zeros((args.num_steps, args.num_envs), dtype=torch.bool, device=device)
    real = torch.zeros((args.num_steps, args.num_envs), dtype=torch.bool, device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    raw_obs, _ = envs.reset()
    next_obs = torch.as_tensor(normalizer.obs(raw_obs), device=device)
    next_real = np.ones(args.num_envs, bool)  # False for the dummy step after an episode ended
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    global_step, start = 0, time.perf_counter()
    timing = dict(env=0.0, inference=0.0, gae=0.0, learn=0.0)

    for iteration in range(1, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs_buf[step] = next_obs
            real[step] = torch.as_tensor(next_real, device=device)
            t0 = time.perf_counter()
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value, action, logprob
            env_action = action.cpu().numpy()
            if agent.continuous:
                env_action = np.clip(env_action, envs.action_space.low, envs.action_space.high)
            t1 = time.perf_counter()
            raw_obs, reward, term, trunc, info = envs.step(env_action if envs.action_space.shape else env_action.astype(np.int32))
            timing["env"] += time.perf_counter() - t1
            timing["inference"] += t1 - t0
            done = np.logical_or(term, trunc)
            if family == "atari":  # a lost life ends the training episode; the game ends at game over
                game_over = done & (info["terminated"] == 1) | trunc
                episodes.step(info["reward"], next_real, game_over)
            else:
                episodes.step(reward, next_real, done)
            rewards[step] = torch.as_tensor(normalizer.reward(reward, done), dtype=torch.float32, device=device)
            dones[step] = torch.as_tensor(done, device=device)
            terminated[step] = torch.as_tensor(term, device=device)
            next_real = ~done
            next_obs = torch.as_tensor(normalizer.obs(raw_obs), device=device)

        t0 = time.perf_counter()
        with torch.no_grad():
            next_value = agent.get_value(next_obs)
            # A dummy reset step leads from the final observation to a reset one: it neither
            # bootstraps nor carries the next episode's advantage back.
            advantages, returns = fastppo.gae(rewards, values, dones | ~real, next_value,
                                              terminated=terminated | ~real, gamma=args.gamma, lam=args.gae_lambda)
        timing["gae"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        b_obs = obs_buf.reshape((-1,) + obs_shape)
        b_actions = actions.reshape((-1,) + action_shape)
        b_logprobs, b_advantages, b_returns = logprobs.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
        b_values, b_real = values.reshape(-1), real.reshape(-1)
        stats = []
        for epoch in range(args.update_epochs):
            order = torch.randperm(batch_size, device=device)
            for start_ in range(0, batch_size, minibatch_size):
                mb = order[start_:start_ + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                out = fastppo.ppo_loss(newlogprob, b_logprobs[mb], b_advantages[mb], newvalue, b_values[mb],
                                       b_returns[mb], entropy, mask=b_real[mb], clip_coef=args.clip_coef,
                                       vf_coef=args.vf_coef, ent_coef=args.ent_coef, clip_vloss=args.clip_vloss,
                                       norm_adv=args.norm_adv)
                optimizer.zero_grad()
                out.loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append(torch.stack(out[1:]))
            if args.target_kl is not None and stats[-1][3].item() > args.target_kl:
                break
        timing["learn"] += time.perf_counter() - t0

        mean_stats = torch.stack(stats).mean(0).tolist()
        y_pred, y_true = b_values[b_real].cpu().numpy(), b_returns[b_real].cpu().numpy()
        var_y = np.var(y_true)
        explained_var = None if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        elapsed = time.perf_counter() - start
        record = dict(
            iteration=iteration, global_step=global_step, sps=global_step / elapsed, time=elapsed,
            episodic_return=episodes.mean_return(), episodes=episodes.count,
            learning_rate=optimizer.param_groups[0]["lr"], explained_variance=explained_var,
            **dict(zip(("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"), mean_stats)),
            **{f"time_{k}": v for k, v in timing.items()},
        )
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if iteration % args.log_every == 0 or iteration == num_iterations:
            eta = elapsed / iteration * (num_iterations - iteration)
            print(
                f"[{iteration}/{num_iterations}] step {global_step} | {record['sps']:.0f} SPS | "
                f"return {'n/a' if record['episodic_return'] is None else format(record['episodic_return'], '.1f')} | "
                f"eta {eta:.0f}s | "
                + " ".join(f"{k} {v:.1f}s" for k, v in timing.items()),
                flush=True,
            )
        if iteration % args.checkpoint_every == 0 or iteration == num_iterations:
            save_checkpoint(run_dir / "checkpoint.pt", dict(
                model=agent.state_dict(), optimizer=optimizer.state_dict(), normalizer=normalizer.state_dict(),
                args=dataclasses.asdict(args), iteration=iteration, global_step=global_step,
            ))
    metrics_file.close()
    envs.close()
    return dict(global_step=global_step, seconds=time.perf_counter() - start,
                episodic_return=episodes.mean_return(), run_dir=str(run_dir))


def main(argv=None) -> int:
    from .cli import parse_dataclass

    args = parse_dataclass(Args, argv, prog="fastppo train", description=__doc__.splitlines()[0])
    try:
        summary = train(args)
    except ValueError as err:
        print(f"fastppo train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
