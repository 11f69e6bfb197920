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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import fastppo
from fastppo.envstep import EnvBoundary


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """the EnvPool task id (CartPole-v1, Pong-v5, HalfCheetah-v5, ...); other gymnasium ids run on gymnasium's vector env"""
    preset: str = "auto"
    """hyperparameter preset: classic, atari, mujoco, or auto (chosen from the env id)"""
    total_timesteps: Optional[int] = None
    """total environment steps (default: the preset's)"""
    learning_rate: Optional[float] = None
    """Adam learning rate (default: the preset's)"""
    num_envs: Optional[int] = None
    """parallel environments (default: the preset's)"""
    num_steps: Optional[int] = None
    """steps per environment per rollout (default: the preset's); in async mode, recv rounds per rollout"""
    async_batch_size: Optional[int] = None
    """EnvPool async mode: step this many of the num_envs environments at a time (fewer than num_envs)"""
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
    """without a terminal (logs, CI): print a progress line every this many iterations"""


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


def _envpool_ids() -> set:
    import envpool

    return set(envpool.list_all_envs())


def env_family(env_id: str) -> str:
    """classic, atari or mujoco (continuous control): picks the preset and the network."""
    if env_id in _envpool_ids():
        import envpool

        spec = envpool.make_spec(env_id)
        if hasattr(spec.config, "episodic_life") and hasattr(spec.config, "reward_clip"):
            return "atari"
        return "mujoco" if len(spec.action_space.shape) > 0 else "classic"
    import gymnasium as gym

    if env_id in gym.registry:  # the gymnasium vector-env fallback
        probe = gym.make(env_id)
        continuous = isinstance(probe.action_space, gym.spaces.Box)
        probe.close()
        return "mujoco" if continuous else "classic"
    close = sorted(e for e in _envpool_ids() if env_id.split("-")[0].lower() in e.lower())[:5]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"--env-id {env_id!r} is not an EnvPool or gymnasium task{hint}")


class GymnasiumVecEnv:
    """A gymnasium vector env shown with EnvPool's interface (single-env spaces, reset, step) for
    tasks EnvPool lacks. Its autoreset is next-step, like EnvPool's."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        import gymnasium as gym

        self.envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                                 vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP))
        self.observation_space = self.envs.single_observation_space
        self.action_space = self.envs.single_action_space
        self.seed = seed

    def reset(self):
        return self.envs.reset(seed=self.seed)

    def step(self, actions):
        return self.envs.step(actions)

    def close(self):
        self.envs.close()


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
    if args.async_batch_size is None and (args.num_envs * args.num_steps) % args.num_minibatches:
        raise ValueError(
            f"--num-minibatches ({args.num_minibatches}) must divide num_envs * num_steps "
            f"({args.num_envs} * {args.num_steps})"
        )
    if args.async_batch_size is not None:
        if not 0 < args.async_batch_size < args.num_envs:
            raise ValueError(f"--async-batch-size must be in [1, num_envs) = [1, {args.num_envs}), got {args.async_batch_size}")
        if (args.async_batch_size * args.num_steps) % args.num_minibatches:
            raise ValueError(f"--num-minibatches ({args.num_minibatches}) must divide async_batch_size * num_steps "
                             f"({args.async_batch_size} * {args.num_steps})")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return args


def make_env(args: Args, family: str):
    if args.env_id not in _envpool_ids():
        if args.async_batch_size is not None:
            raise ValueError(f"--async-batch-size needs an EnvPool task; {args.env_id!r} runs on gymnasium")
        return GymnasiumVecEnv(args.env_id, args.num_envs, args.seed)
    import envpool

    kwargs = dict(env_type="gymnasium", num_envs=args.num_envs, seed=args.seed)
    if args.async_batch_size is not None:
        kwargs.update(batch_size=args.async_batch_size)
    if family == "atari":
        kwargs.update(episodic_life=True, reward_clip=True)
    with warnings.catch_warnings():  # gymnasium notes that EnvPool's float64 Box bounds become float32
        warnings.filterwarnings("ignore", message=".*precision lowered", category=UserWarning)
        return envpool.make(args.env_id, **kwargs)


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


@dataclass(frozen=True)
class Kernels:
    """What fastppo computes in the loop: advantages, the clipped loss and the policy heads. The
    benchmark suite swaps in eager torch versions to measure what the kernels buy end to end."""

    gae: Callable = fastppo.gae
    ppo_loss: Callable = fastppo.ppo_loss
    categorical_logprob_entropy: Callable = fastppo.categorical_logprob_entropy
    normal_logprob_entropy: Callable = fastppo.normal_logprob_entropy


class Agent(nn.Module):
    """Actor-critic: MLPs for vector observations (categorical or state-independent Gaussian
    policy), the Nature CNN for Atari frames."""

    def __init__(self, obs_shape, action_space, family: str, kernels: Kernels = Kernels()):
        super().__init__()
        self.kernels = kernels
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
            logprob, entropy = self.kernels.normal_logprob_entropy(out, self.actor_logstd, action)
        else:
            if action is None:  # Gumbel-max: a sample of softmax(out) without a distribution object
                noise = torch.rand_like(out).clamp_(min=torch.finfo(out.dtype).tiny)
                action = (out - torch.log(-torch.log(noise))).argmax(-1)
            logprob, entropy = self.kernels.categorical_logprob_entropy(out, action.long())
        return action, logprob, entropy, self.critic(h).squeeze(-1)


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, then renamed: a crash mid-write leaves the last one intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rollout_advantages(rewards, values, dones, terminated, real, next_value, gamma, lam, gae=fastppo.gae):
    """GAE over an EnvPool rollout ``[T, N]``. A step that is not ``real`` is the dummy reset step
    after an episode ended: it leads from the final observation to a reset one, so it neither
    bootstraps nor carries the next episode's advantage back (it is masked out of the loss too).
    The real step before it bootstraps from ``values`` of the final observation unless it
    terminated, which is what makes truncation exact."""
    return gae(rewards, values, dones | ~real, next_value, terminated=terminated | ~real, gamma=gamma, lam=lam)


def episode_bookkeeping(family: str, term, trunc, info) -> dict:
    """What ``EnvBoundary.step`` needs beyond the step itself. Atari (episodic life): a lost life
    ends the training episode, but the game, and its unclipped score, go on until game over."""
    if family != "atari":
        return {}
    return dict(episode_reward=info["reward"], episode_over=(np.logical_or(term, trunc) & (info["terminated"] == 1)) | trunc)


class AsyncRollout:
    """EnvPool's async mode (``num_envs > batch_size``): each ``recv`` hands back ``B`` of the
    ``N`` environments, in any order, and each gets its next action by ``send``. A rollout is
    ``T`` recv/send rounds stored as ``T * B`` slots with their env id; a slot's reward and done
    arrive with that env's next recv. The last slot of each env in a rollout is still in flight
    when learning starts: it is masked out and its value bootstraps the env's previous slot (its
    outcome, arriving in the next rollout, still counts for the episode statistics)."""

    def __init__(self, envs, boundary: EnvBoundary, family: str, T: int, B: int, obs_shape, obs_dtype, device):
        self.envs, self.boundary, self.family = envs, boundary, family
        self.T, self.B, self.N, self.device = T, B, boundary.N, device
        self.obs = np.zeros((T * B,) + tuple(obs_shape), obs_dtype)
        self.reward = np.zeros(T * B, np.float32)
        self.done, self.terminated, self.real = (np.zeros(T * B, np.bool_) for _ in range(3))
        self.env = np.zeros(T * B, np.int64)
        self.stage = [np.zeros((B,) + tuple(obs_shape), obs_dtype), np.zeros(B, np.float32)] + [
            np.zeros(B, np.bool_) for _ in range(3)]
        self.pending = np.full(self.N, -1)  # each env's slot whose outcome has not arrived
        boundary.previous_done[:] = True  # the reset observations are no transitions
        envs.async_reset()

    def recv(self, t: int):
        """One recv: books the outcomes into their slots and opens slots t*B .. t*B+B-1."""
        raw_obs, reward, term, trunc, info = self.envs.recv()
        ids = np.asarray(info["env_id"], np.int64)
        stage_obs, stage_reward, stage_done, stage_term, stage_real = self.stage
        self.boundary.step(raw_obs, reward, term, trunc, *self.stage, env_ids=ids,
                           **episode_bookkeeping(self.family, term, trunc, info))
        slots = self.pending[ids]
        done_before = slots >= 0
        for array, values in ((self.reward, stage_reward), (self.done, stage_done), (self.terminated, stage_term),
                              (self.real, stage_real)):
            array[slots[done_before]] = values[done_before]
        new = np.arange(t * self.B, (t + 1) * self.B)
        self.obs[new] = stage_obs
        self.env[new] = ids
        self.real[new] = False  # until the outcome arrives
        self.pending[ids] = new
        return ids, new

    def advantages(self, values: torch.Tensor, gamma: float, lam: float, gae) -> Tuple[torch.Tensor, torch.Tensor]:
        """GAE per environment over the slots of this rollout: each env's complete slots, in order,
        right-aligned in an [L, N] layout whose last_value is the value of its in-flight slot."""
        counts = np.bincount(self.env, minlength=self.N) - 1  # complete slots per env
        L = max(int(counts.max()), 1)
        index = np.full((L, self.N), -1)
        last = np.full(self.N, -1)
        for e in range(self.N):
            slots = np.flatnonzero(self.env == e)
            if len(slots) == 0:
                continue
            last[e] = slots[-1]
            if len(slots) > 1:
                index[L - len(slots) + 1:, e] = slots[:-1]
        pad = index < 0
        idx = torch.as_tensor(np.where(pad, 0, index), device=self.device)
        padded = torch.as_tensor(pad, device=self.device)
        take = lambda x: torch.as_tensor(x, device=self.device)[idx]  # noqa: E731
        last_value = torch.where(torch.as_tensor(last >= 0, device=self.device),
                                 values[torch.as_tensor(np.maximum(last, 0), device=self.device)], torch.zeros_like(values[:self.N]))
        # Padding rows are treated like dummy reset steps: they neither bootstrap nor carry a trace.
        adv, ret = rollout_advantages(take(self.reward).to(values.dtype), values[idx], take(self.done),
                                      take(self.terminated), take(self.real) & ~padded, last_value, gamma, lam, gae)
        flat_adv, flat_ret = torch.zeros_like(values), torch.zeros_like(values)
        keep = ~padded
        flat_adv[idx[keep]] = adv[keep]
        flat_ret[idx[keep]] = ret[keep]
        return flat_adv, flat_ret


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason."""


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint written by ``train``; a missing, truncated or foreign file is a clear
    ``CheckpointError`` naming the file."""
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged zip / pickle
        raise CheckpointError(f"checkpoint {path} is damaged and cannot be read ({type(err).__name__}: {err})") from err
    missing = {"model", "optimizer", "boundary", "args", "iteration", "global_step", "rng", "actions"} - set(state)
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a fastppo training checkpoint (missing {sorted(missing)})")
    return state


class Progress:
    """The live status (steps, SPS, recent mean return, ETA, timing sections): a tqdm bar on a
    terminal, a printed line every ``every`` iterations otherwise (logs, CI)."""

    def __init__(self, total_iterations: int, first_iteration: int, every: int):
        self.total, self.every = total_iterations, every
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_iterations, initial=first_iteration - 1, unit="it", dynamic_ncols=True)

    @staticmethod
    def _fields(record: dict, timing: dict) -> str:
        ret = record["episodic_return"]
        return (f"step {record['global_step']} | {record['sps']:.0f} SPS | "
                f"return {'n/a' if ret is None else format(ret, '.1f')} | "
                + " ".join(f"{k} {v:.1f}s" for k, v in timing.items()))

    def update(self, iteration: int, record: dict, timing: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._fields(record, timing), refresh=True)
            return
        if iteration % self.every and iteration != self.total:
            return
        eta = record["time"] / max(iteration - record["first_iteration"] + 1, 1) * (self.total - iteration)
        print(f"[{iteration}/{self.total}] {self._fields(record, timing)} | eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train(args: Args, resume: Optional[str] = None, envs=None, stop_after: Optional[int] = None,
          kernels: Kernels = Kernels()) -> dict:
    """Runs PPO with ``args`` and returns a summary (steps, seconds, recent mean return, run dir).

    ``resume``: a run directory (or its checkpoint) to continue; its saved config is used and the
    environments are brought back to where they were by replaying the logged actions from the
    same seed, so on the CPU the continued run matches an uninterrupted one. ``envs``: an
    environment object to use instead of EnvPool's (tests). ``stop_after``: stop after this many
    iterations (as if killed right after that iteration's checkpoint). ``kernels``: the
    computations to use (the benchmark suite's eager baseline).
    """
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(Path(resume))
        args = Args(**checkpoint["args"])
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    args = resolve(args) if envs is None else args
    family = env_family(args.env_id) if envs is None else "classic"
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if checkpoint is None:
        run_name = args.run_name or f"{args.env_id}__seed{args.seed}__{int(time.time())}"
        run_dir = Path(args.run_dir) / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    envs = make_env(args, family) if envs is None else envs
    obs_shape = envs.observation_space.shape
    continuous = len(envs.action_space.shape) > 0
    agent = Agent(obs_shape, envs.action_space, family, kernels).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    mujoco = family == "mujoco"
    boundary = EnvBoundary(args.num_envs, obs_shape, normalize_obs=mujoco, normalize_reward=mujoco, gamma=args.gamma)

    batch_size = (args.async_batch_size or args.num_envs) * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = max(1, args.total_timesteps // batch_size)
    T, N = args.num_steps, args.num_envs
    # Rollout storage in host memory, written by the env boundary; the torch views share it on
    # the CPU and are copied once per rollout to a GPU.
    obs_np = np.zeros((T + 1, N) + obs_shape, np.uint8 if family == "atari" else np.float32)
    reward_np = np.zeros((T, N), np.float32)
    done_np, term_np, real_np = (np.zeros((T, N), np.bool_) for _ in range(3))
    scratch = [np.zeros(N, np.float32)] + [np.zeros(N, np.bool_) for _ in range(3)]
    action_shape = envs.action_space.shape
    B = args.async_batch_size
    slots = (T, N) if B is None else (T * B,)
    actions = torch.zeros(slots + action_shape, device=device)
    logprobs = torch.zeros(slots, device=device)
    values = torch.zeros(slots, device=device)
    action_log: list = []

    def to_env(action: torch.Tensor) -> np.ndarray:
        a = action.cpu().numpy()
        return np.clip(a, envs.action_space.low, envs.action_space.high) if continuous else a.astype(np.int32)

    first_iteration, global_step = 1, 0
    async_rollout = None
    if args.async_batch_size is not None:
        if checkpoint is not None:
            raise CheckpointError("an async-mode run cannot be resumed: its environments' order of steps is not replayable")
        async_rollout = AsyncRollout(envs, boundary, family, T, args.async_batch_size, obs_shape, obs_np.dtype, device)
        raw_obs = None
    else:
        raw_obs, _ = envs.reset()
    if checkpoint is not None:
        # Bring the environments back to the checkpoint by replaying every logged action.
        logged = checkpoint["actions"]
        for a in logged:
            raw_obs, *_ = envs.step(a)
        if not np.array_equal(np.asarray(raw_obs), checkpoint["raw_obs"]):
            raise CheckpointError(f"replaying {len(logged)} logged steps did not reproduce the environments' state")
        action_log = list(logged)
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        boundary.load_state_dict(checkpoint["boundary"])
        obs_np[0] = checkpoint["next_obs"]
        first_iteration, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        _set_rng_state(checkpoint["rng"])
    elif async_rollout is None:
        boundary.previous_done[:] = True  # the reset observation is no transition: nothing is booked
        boundary.step(raw_obs, np.zeros(N, np.float32), np.zeros(N, bool), np.zeros(N, bool), obs_np[0], *scratch)

    metrics_file = open(run_dir / "metrics.jsonl", "a")
    writer = _tensorboard(run_dir)
    progress = Progress(num_iterations, first_iteration, args.log_every)
    start = time.perf_counter()
    timing = dict(env=0.0, inference=0.0, gae=0.0, learn=0.0)
    iteration = first_iteration - 1
    for iteration in range(first_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        if async_rollout is None:
            obs_t = torch.from_numpy(obs_np)
            for step in range(T):
                global_step += N
                t0 = time.perf_counter()
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(obs_t[step].to(device, non_blocking=True))
                values[step], actions[step], logprobs[step] = value, action, logprob
                env_action = to_env(action)
                action_log.append(env_action)
                t1 = time.perf_counter()
                raw_obs, reward, term, trunc, info = envs.step(env_action)
                boundary.step(raw_obs, reward, term, trunc, obs_np[step + 1], reward_np[step], done_np[step],
                              term_np[step], real_np[step], **episode_bookkeeping(family, term, trunc, info))
                timing["env"] += time.perf_counter() - t1
                timing["inference"] += t1 - t0

            t0 = time.perf_counter()
            rewards, dones, terminated, real = (torch.from_numpy(x).to(device) for x in (reward_np, done_np, term_np, real_np))
            obs_dev = obs_t.to(device)
            with torch.no_grad():
                next_value = agent.get_value(obs_dev[T])
                advantages, returns = rollout_advantages(rewards, values, dones, terminated, real, next_value,
                                                         args.gamma, args.gae_lambda, kernels.gae)
            timing["gae"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            b_obs = obs_dev[:T].reshape((-1,) + obs_shape)
            b_actions = actions.reshape((-1,) + action_shape)
            b_logprobs, b_advantages, b_returns = logprobs.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
            b_values, b_real = values.reshape(-1), real.reshape(-1)
        else:
            async_rollout.pending[:] = -1  # outcomes of the last rollout's in-flight slots are not stored
            for step in range(T):
                t1 = time.perf_counter()
                ids, slots = async_rollout.recv(step)
                t0 = time.perf_counter()
                timing["env"] += t0 - t1
                global_step += len(ids)
                obs_batch = torch.from_numpy(async_rollout.obs[slots]).to(device)
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(obs_batch)
                flat = torch.as_tensor(slots, device=device)
                values[flat], actions[flat], logprobs[flat] = value, action.to(actions.dtype), logprob
                envs.send(to_env(action), ids.astype(np.int32))
                timing["inference"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                advantages, returns = async_rollout.advantages(values, args.gamma, args.gae_lambda, kernels.gae)
            timing["gae"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            b_obs = torch.from_numpy(async_rollout.obs).to(device)
            b_actions, b_logprobs, b_values = actions, logprobs, values
            b_advantages, b_returns = advantages, returns
            b_real = torch.from_numpy(async_rollout.real).to(device)
        stats = []
        for epoch in range(args.update_epochs):
            order = torch.randperm(batch_size, device=device)
            for start_ in range(0, batch_size, minibatch_size):
                mb = order[start_:start_ + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                out = kernels.ppo_loss(newlogprob, b_logprobs[mb], b_advantages[mb], newvalue, b_values[mb],
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
        obs_np[0] = obs_np[T]
        timing["learn"] += time.perf_counter() - t0

        mean_stats = torch.stack(stats).mean(0).tolist()
        y_pred, y_true = b_values[b_real].cpu().numpy(), b_returns[b_real].cpu().numpy()
        var_y = np.var(y_true)
        explained_var = None if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        elapsed = time.perf_counter() - start
        record = dict(
            iteration=iteration, global_step=global_step, sps=(iteration - first_iteration + 1) * batch_size / elapsed,
            time=elapsed, first_iteration=first_iteration, episodic_return=boundary.recent_mean_return(),
            episodes=boundary.episodes, learning_rate=optimizer.param_groups[0]["lr"], explained_variance=explained_var,
            **dict(zip(("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"), mean_stats)),
            **{f"time_{k}": v for k, v in timing.items()},
        )
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "global_step", "first_iteration"):
                    writer.add_scalar(key, value, global_step)
        progress.update(iteration, record, timing)
        if iteration % args.checkpoint_every == 0 or iteration == num_iterations or iteration == stop_after:
            save_checkpoint(run_dir / "checkpoint.pt", dict(
                model=agent.state_dict(), optimizer=optimizer.state_dict(), boundary=boundary.state_dict(),
                args=dataclasses.asdict(args), iteration=iteration, global_step=global_step, rng=_rng_state(),
                actions=np.stack(action_log) if action_log else np.zeros((0, N) + action_shape),
                raw_obs=None if raw_obs is None else np.asarray(raw_obs), next_obs=obs_np[0].copy(),
            ))
        if iteration == stop_after:
            break
    metrics_file.close()
    progress.close()
    if writer is not None:
        writer.close()
    envs.close()
    return dict(global_step=global_step, iterations=iteration, seconds=time.perf_counter() - start,
                episodic_return=boundary.recent_mean_return(), episodes=boundary.episodes, run_dir=str(run_dir))


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))


def evaluate(path: str, episodes: int = 10, device: str = "cpu", seed: int = 12345) -> dict:
    """Runs the saved policy (greedy for discrete actions, the mean for continuous ones) with the
    saved normalization statistics, frozen, until ``episodes`` episodes end; returns their mean
    and std return."""
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    state = load_checkpoint(Path(path))
    args = dataclasses.replace(Args(**state["args"]), seed=seed, num_envs=min(episodes, 8))
    family = env_family(args.env_id)
    envs = make_env(args, family)
    obs_shape = envs.observation_space.shape
    agent = Agent(obs_shape, envs.action_space, family).to(device)
    agent.load_state_dict(state["model"])
    agent.eval()
    boundary = EnvBoundary(args.num_envs, obs_shape, normalize_obs=family == "mujoco", gamma=args.gamma)
    saved = state["boundary"]
    for name in ("obs_count", "obs_mean", "obs_m2"):
        getattr(boundary, name)[...] = saved[name]
    obs = np.zeros((args.num_envs,) + obs_shape, np.uint8 if family == "atari" else np.float32)
    scratch = [np.zeros(args.num_envs, np.float32)] + [np.zeros(args.num_envs, np.bool_) for _ in range(3)]
    raw_obs, _ = envs.reset()
    boundary.previous_done[:] = True
    boundary.step(raw_obs, np.zeros(args.num_envs, np.float32), np.zeros(args.num_envs, bool),
                  np.zeros(args.num_envs, bool), obs, *scratch, update_stats=False)
    returns = []
    continuous = len(envs.action_space.shape) > 0
    while len(returns) < episodes:
        with torch.no_grad():
            h = agent.features(torch.from_numpy(obs).to(device))
            out = agent.actor(h)
            action = (out if continuous else out.argmax(-1)).cpu().numpy()
        action = np.clip(action, envs.action_space.low, envs.action_space.high) if continuous else action.astype(np.int32)
        raw_obs, reward, term, trunc, info = envs.step(action)
        finished = boundary.step(raw_obs, reward, term, trunc, obs, *scratch, update_stats=False,
                                 **episode_bookkeeping(family, term, trunc, info))
        returns.extend(r for r, _ in finished)
    envs.close()
    returns = np.array(returns[:episodes])
    return dict(env_id=args.env_id, episodes=int(returns.size), mean_return=float(returns.mean()),
                std_return=float(returns.std()), checkpoint_step=state["global_step"])


def main(argv=None) -> int:
    from .cli import parse_dataclass

    argv = list(sys.argv[1:] if argv is None else argv)
    resume = None
    if "--resume" in argv:
        i = argv.index("--resume")
        if i + 1 >= len(argv):
            print("fastppo train: error: --resume needs a run directory", file=sys.stderr)
            return 2
        resume = argv[i + 1]
        del argv[i:i + 2]
        if argv:
            print(f"fastppo train: error: --resume continues a run with its saved settings; drop {argv}", file=sys.stderr)
            return 2
    args = parse_dataclass(Args, argv, prog="fastppo train", description=__doc__.splitlines()[0])
    try:
        summary = train(args, resume=resume)
    except (ValueError, CheckpointError) as err:
        print(f"fastppo train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def eval_main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastppo eval", description="Evaluate a saved policy.")
    parser.add_argument("path", help="a run directory or its checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the evaluation environments")
    ns = parser.parse_args(argv)
    try:
        result = evaluate(ns.path, ns.episodes, ns.device, ns.seed)
    except (ValueError, CheckpointError) as err:
        print(f"fastppo eval: error: {err}", file=sys.stderr)
        return 2
    print(f"{result['env_id']}: {result['mean_return']:.2f} +- {result['std_return']:.2f} over {result['episodes']} episodes")
    print(json.dumps(result))
    return 0
