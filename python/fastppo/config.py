"""``fastppo train``'s settings: the ``Args`` dataclass (tyro makes each field a flag and the
docstring line under it its help), the presets, and what a run's settings resolve to: ``resolve``
fills in the preset and checks every value, ``rank_share`` is one rank's part of a data-parallel run,
``policy_backend`` and ``train_device`` where and how the policy runs, ``action_masks_on`` whether
its policy samples among the legal actions the environments give."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Annotated, Optional, Tuple, TypeVar

import torch
import tyro

from fastppo.agent import ACTION_MASKS, SQUASH, ActionHead, Kernels, MlpShape, action_head
from fastppo.envs import env_family, probe_actions

__all__ = ["Args", "FAST_PRESET_TASKS", "LSTM_PRESET_TASKS", "MUJOCO_AUTO_PRESETS", "MUJOCO_ZOO_TASKS", "PRESETS",
           "RECURRENT", "action_masks_on", "auto_preset", "policy_backend", "preset_values", "rank_share",
           "recurrent_cell", "resolve", "train_device"]

_T = TypeVar("_T")
# --recurrent's choices: a feed-forward policy, or the RNN cell of a recurrent one.
RECURRENT = ("none", "lstm", "gru")
# A setting that resolve() takes from the preset when it is left at None.
FromPreset = Annotated[Optional[_T], tyro.conf.arg(help_behavior_hint="(default: the preset's)")]


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    """the EnvPool task id (CartPole-v1, Pong-v5, HalfCheetah-v5, ...); other gymnasium ids run on gymnasium's vector env, and MODULE:ID imports MODULE (which registers ID) first, e.g. my_pkg.envs:MyEnv-v0"""
    preset: str = "auto"
    """hyperparameter preset: classic (CleanRL's ppo.py), classic-fast (least wall time to solve CartPole), classic-lstm (rl-baselines3-zoo's RecurrentPPO CartPoleNoVel-v1 settings), atari, mujoco (CleanRL's ppo_continuous_action.py), mujoco-fast (mujoco's batch from 2 environments stepped on 2 threads), mujoco-zoo (rl-baselines3-zoo's tuned PPO settings of each MuJoCo task), or auto (classic-fast for CartPole, classic-lstm for CartPoleNoVel-v1, for MuJoCo tasks the preset with the best 1M-step return (mujoco-zoo for HalfCheetah, mujoco-fast for Walker2d, else mujoco), else the env family's)"""
    total_timesteps: FromPreset[int] = None
    """total environment steps"""
    learning_rate: FromPreset[float] = None
    """Adam learning rate"""
    num_envs: FromPreset[int] = None
    """parallel environments"""
    num_steps: FromPreset[int] = None
    """steps per environment per rollout; in async mode, recv rounds per rollout"""
    env_threads: Optional[int] = None
    """EnvPool worker threads (unset: 1 for classic control, whose steps cost less than handing them to another thread; else EnvPool's default)"""
    async_batch_size: Optional[int] = None
    """EnvPool async mode: step this many of the num_envs environments at a time (fewer than num_envs)"""
    anneal_lr: FromPreset[bool] = None
    """anneal the learning rate linearly to 0"""
    gamma: FromPreset[float] = None
    """discount factor"""
    gae_lambda: FromPreset[float] = None
    """GAE lambda"""
    num_minibatches: FromPreset[int] = None
    """minibatches per epoch"""
    update_epochs: FromPreset[int] = None
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: FromPreset[float] = None
    """surrogate clipping coefficient"""
    clip_vloss: FromPreset[bool] = None
    """clip the value loss"""
    ent_coef: FromPreset[float] = None
    """entropy bonus coefficient"""
    vf_coef: FromPreset[float] = None
    """value loss coefficient (of the loss 0.5 * (V - R)^2, CleanRL's; Stable-Baselines3's vf_coef weighs (V - R)^2, so it is half of this)"""
    max_grad_norm: FromPreset[float] = None
    """gradient norm clip"""
    hidden_sizes: FromPreset[Tuple[int, ...]] = None
    """units of the MLP policy's hidden layers, the actor's and the critic's (each its own stack), e.g. --hidden-sizes 256 256"""
    activation: FromPreset[str] = None
    """the MLP policy's activation: tanh or relu"""
    log_std_init: FromPreset[float] = None
    """the initial log-std of a Gaussian policy (state-independent)"""
    ortho_init: FromPreset[bool] = None
    """orthogonal initialization of the MLP policy (gains sqrt(2), 0.01 for the actor's output, 1 for the critic's: CleanRL's and Stable-Baselines3's); off: torch's default nn.Linear initialization"""
    target_kl: Optional[float] = None
    """stop an update's epochs early when approx_kl exceeds this"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    run_dir: str = "runs"
    """directory under which the run's folder (metrics, checkpoints) is made"""
    run_name: Optional[str] = None
    """name of the run's folder (unset: env id, seed and time)"""
    checkpoint_every: int = 50
    """write a checkpoint every this many iterations (and at the end)"""
    resume_replay: bool = False
    """log every action sent to the environments so that --resume replays them and continues bit-identically (sync environments; the checkpoint grows with the run). Off: --resume restores the model, optimizer, statistics, random streams and counters and starts the environments afresh, in constant time and checkpoint size"""
    log_every: int = 1
    """without a terminal (logs, CI): print a progress line every this many iterations"""
    policy_backend: str = "auto"
    """fused (one C++ call per rollout step and per minibatch update: MLP policies on the CPU), torch (eager PyTorch), or auto (fused where it applies)"""
    track: bool = False
    """log to Weights & Biases (CleanRL's metric names, the run's settings, the captured videos); WANDB_MODE=offline logs offline"""
    wandb_project: str = "fastppo"
    """the W&B project of --track"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team or user) of --track (unset: your default)"""
    capture_video: bool = False
    """record an episode of the deterministic policy on the gymnasium task every --video-every iterations and at the end, into the run folder's videos/"""
    video_every: int = 50
    """with --capture-video: iterations between videos"""
    video_max_steps: Optional[int] = None
    """with --capture-video: end a video's episode after this many steps (unset: when the episode ends)"""
    recurrent: FromPreset[str] = None
    """none, lstm or gru: a recurrent policy whose state is carried through each environment's episode (reset at episode starts); minibatches are then whole environments' rollouts (--num-minibatches must divide --num-envs), run through the RNN in one call each; sync environments; an LSTM on vector observations runs on the fused backend (one C++ call per minibatch), a GRU or an Atari one on torch"""
    recurrent_hidden_size: int = 64
    """units of the recurrent policy's LSTM / GRU (with --recurrent)"""
    recurrent_shared: bool = False
    """with --recurrent: one RNN read by the actor and the critic (CleanRL's ppo_atari_lstm.py); off: each has its own (sb3-contrib's default)"""
    normalize_obs: FromPreset[bool] = None
    """normalize observations by their running mean and std, clipped to +-10 (unset: the preset's, else on for MuJoCo tasks)"""
    normalize_reward: FromPreset[bool] = None
    """scale rewards by the running std of the discounted return, clipped to +-10 (unset: the preset's, else on for MuJoCo tasks)"""
    anneal_clip: FromPreset[bool] = None
    """anneal the surrogate clipping coefficient linearly to 0 like the learning rate (rl-baselines3-zoo's lin_ clip_range; the value clip follows it under --clip-vloss)"""
    squash: str = "none"
    """the Gaussian policy of a Box action space: none (CleanRL's: its sample clipped to the bounds when sent to the environments; every preset's) or tanh (squashed into the bounds, which must be finite: the environments get low + (tanh(u) + 1) * (high - low) / 2 and the log-prob is taken at the stored sample u)"""
    action_masks: str = "auto"
    """auto, on or off: sample Discrete / MultiDiscrete actions among the legal ones the environments give at each step (info["action_mask"] of reset and step, or the gymnasium environments' action_masks() method), and score them in the update under the same masks; auto: on when the task gives masks; on: an error when it does not"""


# What every preset has unless it says otherwise: CleanRL's value and gradient-norm coefficients, a
# learning rate annealed to 0, CleanRL's 64-64 tanh MLPs (orthogonal init, log-std 0).
_COMMON = dict(vf_coef=0.5, max_grad_norm=0.5, anneal_lr=True, hidden_sizes=(64, 64), activation="tanh",
               log_std_init=0.0, ortho_init=True)
# The feed-forward presets: no RNN, a fixed clipping coefficient. (Their normalization follows the env
# family: on for MuJoCo tasks; resolve() fills it in.)
_PLAIN = dict(recurrent="none", anneal_clip=False, **_COMMON)

PRESETS = {
    # CleanRL ppo.py
    "classic": dict(total_timesteps=500_000, learning_rate=2.5e-4, num_envs=4, num_steps=128,
                    num_minibatches=4, update_epochs=4, clip_coef=0.2, ent_coef=0.01, gamma=0.99, gae_lambda=0.95, clip_vloss=True,
                    **_PLAIN),
    # Least wall time to solve classic control on a small CPU: rl-baselines3-zoo's CartPole-v1 settings
    # (8 envs x 32 steps, one 256-sample minibatch, 20 epochs, gamma 0.98, lambda 0.8, lr 1e-3 annealed),
    # which learn in few steps and leave the fused policy step most of the time
    # (benchmarks/results/e2e_default.md: time to a mean return of 475).
    "classic-fast": dict(total_timesteps=150_000, learning_rate=1e-3, num_envs=8, num_steps=32,
                         num_minibatches=1, update_epochs=20, clip_coef=0.2, ent_coef=0.0, gamma=0.98, gae_lambda=0.8,
                         clip_vloss=False, **_PLAIN),
    # rl-baselines3-zoo's RecurrentPPO CartPoleNoVel-v1 (hyperparams/ppo_lstm.yml): 8 envs x 32 steps, one
    # 256-sample minibatch, 20 epochs, gamma 0.98, lambda 0.8, lr lin_0.001 and clip_range lin_0.2 (both
    # annealed), ent_coef 0, no value clipping, VecNormalize (observations and rewards), 1e5 steps, an LSTM
    # of 64 units for the actor and one for the critic (RecurrentAgent's architecture is that policy's);
    # SB3's default vf_coef 0.5 weighs (V - R)^2, so 1.0 here (with 0.5, 475 was reached on 1-2 of seeds
    # 1-3 at 100k steps; with 1.0 on all three, benchmarks/results/recurrent_cpu.md).
    "classic-lstm": dict(total_timesteps=100_000, learning_rate=1e-3, num_envs=8, num_steps=32,
                         num_minibatches=1, update_epochs=20, clip_coef=0.2, ent_coef=0.0, gamma=0.98, gae_lambda=0.8,
                         clip_vloss=False, recurrent="lstm", normalize_obs=True, normalize_reward=True, anneal_clip=True,
                         **dict(_COMMON, vf_coef=1.0)),
    # CleanRL ppo_atari_envpool.py
    "atari": dict(total_timesteps=10_000_000, learning_rate=2.5e-4, num_envs=8, num_steps=128,
                  num_minibatches=4, update_epochs=4, clip_coef=0.1, ent_coef=0.01, gamma=0.99, gae_lambda=0.95, clip_vloss=True,
                  **_PLAIN),
    # CleanRL ppo_continuous_action.py
    "mujoco": dict(total_timesteps=1_000_000, learning_rate=3e-4, num_envs=1, num_steps=2048,
                   num_minibatches=32, update_epochs=10, clip_coef=0.2, ent_coef=0.0, gamma=0.99, gae_lambda=0.95, clip_vloss=True,
                   **_PLAIN),
    # CleanRL's settings with the 2048-step rollout from 2 environments of 1024 steps, which EnvPool steps on
    # two threads: the same batch, minibatches and epochs per update, the physics on two cores (1.5-1.7x
    # mujoco's steps/s here; at 1M steps the return is higher on Walker2d, about the same on Hopper and
    # lower on HalfCheetah: benchmarks/results/mujoco_1m.md).
    "mujoco-fast": dict(total_timesteps=1_000_000, learning_rate=3e-4, num_envs=2, num_steps=1024,
                        num_minibatches=32, update_epochs=10, clip_coef=0.2, ent_coef=0.0, gamma=0.99, gae_lambda=0.95,
                        clip_vloss=True, **_PLAIN),
    # rl-baselines3-zoo's PPO for MuJoCo tasks (hyperparams/ppo.yml): its "mujoco-defaults" here, which are
    # Stable-Baselines3's PPO defaults (2048 steps, minibatches of 64, 10 epochs, lr 3e-4 constant, clip 0.2,
    # no value clipping, vf_coef 0.5 of SB3's (V - R)^2, i.e. 1.0 here, 64-64 tanh MLPs) with VecNormalize
    # (observations and rewards, at the task's gamma); MUJOCO_ZOO_TASKS holds the tasks it tuned.
    "mujoco-zoo": dict(total_timesteps=1_000_000, learning_rate=3e-4, num_envs=1, num_steps=2048,
                       num_minibatches=32, update_epochs=10, clip_coef=0.2, ent_coef=0.0, gamma=0.99, gae_lambda=0.95,
                       clip_vloss=False, normalize_obs=True, normalize_reward=True,
                       **dict(_PLAIN, vf_coef=1.0, anneal_lr=False)),
}


def _zoo(n_envs: int, n_steps: int, batch_size: int, n_epochs: int, gamma: float, gae_lambda: float, lr: float,
         ent_coef: float, clip_range: float, max_grad_norm: float, vf_coef: float, n_timesteps: int = 1_000_000,
         tuned_policy: bool = True) -> dict:
    """One task's rl-baselines3-zoo PPO entry in this trainer's terms: minibatches = n_envs * n_steps /
    batch_size (one when the batch size is the rollout's or more, as SB3 then takes the whole rollout); the value coefficient doubled (SB3 weighs (V - R)^2, fastppo 0.5 * (V - R)^2); lr and
    clip range constant; ``tuned_policy``: the entry's policy_kwargs ``log_std_init=-2,
    ortho_init=False, activation_fn=nn.ReLU, net_arch=dict(pi=[256, 256], vf=[256, 256])`` (else
    SB3's default policy: 64-64 tanh, orthogonal init, log-std 0)."""
    values = dict(total_timesteps=n_timesteps, num_envs=n_envs, num_steps=n_steps,
                  num_minibatches=max(1, n_envs * n_steps // batch_size), update_epochs=n_epochs, gamma=gamma,
                  gae_lambda=gae_lambda, learning_rate=lr, ent_coef=ent_coef, clip_coef=clip_range,
                  max_grad_norm=max_grad_norm, vf_coef=2.0 * vf_coef)
    if tuned_policy:
        values.update(hidden_sizes=(256, 256), activation="relu", log_std_init=-2.0, ortho_init=False)
    return values


# rl-baselines3-zoo's tuned PPO settings of MuJoCo tasks (hyperparams/ppo.yml, its v4 entries; the task
# name without its version picks them). Its benchmark (benchmark.md, v3 tasks, 1M steps, deterministic
# evaluation): HalfCheetah 5819 +- 664, Hopper 2410 +- 10, Walker2d 3479 +- 822, Swimmer 282 +- 10.
MUJOCO_ZOO_TASKS = {
    "HalfCheetah": _zoo(1, 512, 64, 20, 0.98, 0.92, 2.0633e-05, 0.000401762, 0.1, 0.8, 0.58096),
    "Hopper": _zoo(1, 512, 32, 5, 0.999, 0.99, 9.80828e-05, 0.00229519, 0.2, 0.7, 0.835671),
    "Walker2d": _zoo(1, 512, 32, 20, 0.99, 0.95, 5.05041e-05, 0.000585045, 0.1, 1.0, 0.871923, tuned_policy=False),
    "Humanoid": _zoo(1, 512, 256, 5, 0.95, 0.9, 3.56987e-05, 0.00238306, 0.3, 2.0, 0.431892, 10_000_000),
    "HumanoidStandup": _zoo(1, 512, 32, 20, 0.99, 0.9, 2.55673e-05, 3.62109e-06, 0.3, 0.7, 0.430793, 10_000_000),
    "InvertedDoublePendulum": _zoo(1, 128, 512, 10, 0.98, 0.8, 0.000155454, 1.05057e-06, 0.4, 0.5, 0.695929,
                                   tuned_policy=False),
    "InvertedPendulum": _zoo(1, 32, 64, 5, 0.999, 0.9, 0.000222425, 1.37976e-07, 0.4, 0.3, 0.19816, tuned_policy=False),
    "Reacher": _zoo(1, 512, 32, 5, 0.9, 1.0, 0.000104019, 7.52585e-08, 0.3, 0.9, 0.950368, tuned_policy=False),
    # Swimmer: the mujoco-defaults with its own gamma, envs, steps, batch, lr and lambda.
    "Swimmer": dict(num_envs=4, num_steps=1024, num_minibatches=4 * 1024 // 256, gamma=0.9999, learning_rate=6e-4,
                    gae_lambda=0.98),
}


def _task_name(env_id: str) -> str:
    """The MuJoCo task a preset table is keyed by: the id without its module or version (``Hopper``)."""
    return env_id.split(":")[-1].split("-v")[0]


def preset_values(preset: str, env_id: str) -> dict:
    """The settings ``preset`` gives ``env_id``: the preset's, and for ``mujoco-zoo`` the task's tuned
    ones over them (a task it has none for keeps rl-baselines3-zoo's MuJoCo defaults)."""
    values = dict(PRESETS[preset])
    if preset == "mujoco-zoo":
        values.update(MUJOCO_ZOO_TASKS.get(_task_name(env_id), {}))
    return values


# --preset auto for MuJoCo tasks: the preset with the best mean return at 1M steps over 3 seeds
# (benchmarks/results/mujoco_1m.md), by task name without its version; MUJOCO_AUTO_DEFAULT for the others.
# (Final return, mean of the last 10 training episodes, over seeds 1-3: HalfCheetah-v5 mujoco-zoo 5243,
# mujoco 2490, mujoco-fast 1730; Hopper-v5 mujoco 2450, mujoco-fast 2361, mujoco-zoo 460; Walker2d-v5
# mujoco-fast 4022, mujoco 3756, mujoco-zoo 2455.)
MUJOCO_AUTO_PRESETS = {"HalfCheetah": "mujoco-zoo", "Hopper": "mujoco", "Walker2d": "mujoco-fast"}
MUJOCO_AUTO_DEFAULT = "mujoco"


def auto_preset(env_id: str, family: str) -> str:
    """What ``--preset auto`` picks for ``env_id`` of ``family`` (classic, atari or mujoco)."""
    if env_id in FAST_PRESET_TASKS:
        return "classic-fast"  # the preset that solves CartPole in the least wall time
    if env_id in LSTM_PRESET_TASKS:
        return "classic-lstm"
    if family == "mujoco":
        return MUJOCO_AUTO_PRESETS.get(_task_name(env_id), MUJOCO_AUTO_DEFAULT)
    return family


# Tasks whose --preset auto is classic-fast (the settings it takes were tuned for them).
FAST_PRESET_TASKS = ("CartPole-v0", "CartPole-v1")
# Tasks whose --preset auto is classic-lstm (the task its settings were tuned for).
LSTM_PRESET_TASKS = ("CartPoleNoVel-v1",)


def resolve(args: Args) -> Args:
    """Fills the preset's values into the fields left at None and checks every value."""
    family = env_family(args.env_id)
    preset = args.preset
    if preset == "auto":
        preset = auto_preset(args.env_id, family)
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of auto, {', '.join(PRESETS)}; got {args.preset!r}")
    if recurrent_cell(args) is not None or (args.recurrent is None and PRESETS[preset]["recurrent"] != "none"):
        given = [f"--{f.replace('_', '-')}" for f in ("hidden_sizes", "activation", "ortho_init")
                 if getattr(args, f) not in (None, PRESETS[preset][f])]  # (a resumed run's settings hold the preset's)
        if given:
            raise ValueError(f"{', '.join(given)} shape(s) the feed-forward MLP policy; a recurrent policy's layers are "
                             "set by --recurrent-hidden-size")
    values = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in preset_values(preset, args.env_id).items()}
    for name in ("normalize_obs", "normalize_reward"):  # unless the preset says: on for MuJoCo tasks, as always
        values.setdefault(name, family == "mujoco" if getattr(args, name) is None else getattr(args, name))
    args = dataclasses.replace(args, preset=preset, **values)
    checks = [
        ("total_timesteps", args.total_timesteps > 0, "> 0"), ("num_envs", args.num_envs > 0, "> 0"),
        ("num_steps", args.num_steps > 0, "> 0"), ("learning_rate", args.learning_rate > 0, "> 0"),
        ("num_minibatches", args.num_minibatches > 0, "> 0"), ("update_epochs", args.update_epochs > 0, "> 0"),
        ("clip_coef", args.clip_coef > 0, "> 0"), ("gamma", 0 <= args.gamma <= 1, "in [0, 1]"),
        ("gae_lambda", 0 <= args.gae_lambda <= 1, "in [0, 1]"), ("checkpoint_every", args.checkpoint_every > 0, "> 0"),
        ("log_every", args.log_every > 0, "> 0"), ("video_every", args.video_every > 0, "> 0"),
        ("video_max_steps", args.video_max_steps is None or args.video_max_steps > 0, "> 0"), ("env_threads", args.env_threads is None or args.env_threads > 0, "> 0"),
        ("vf_coef", args.vf_coef >= 0, ">= 0"), ("max_grad_norm", args.max_grad_norm > 0, "> 0"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)!r}")
    MlpShape.of(args)  # --hidden-sizes, --activation, --log-std-init
    if args.recurrent not in (None, "none") and args.num_envs % args.num_minibatches:
        raise ValueError(f"--num-minibatches ({args.num_minibatches}) must divide --num-envs ({args.num_envs}) "
                         f"with --recurrent {args.recurrent}: each minibatch holds whole environments' rollouts")
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
    if args.recurrent not in RECURRENT:
        raise ValueError(f"--recurrent must be one of {', '.join(RECURRENT)}, got {args.recurrent!r}")
    if args.recurrent == "none":
        if args.recurrent_shared or args.recurrent_hidden_size != Args.recurrent_hidden_size:
            flag = "--recurrent-shared" if args.recurrent_shared else f"--recurrent-hidden-size {args.recurrent_hidden_size}"
            raise ValueError(f"{flag} shapes a recurrent policy: it needs --recurrent lstm or gru (this run's policy "
                             "is feed-forward: --recurrent none)")
    else:
        if args.recurrent_hidden_size < 1:
            raise ValueError(f"--recurrent-hidden-size must be >= 1, got {args.recurrent_hidden_size}")
        if args.async_batch_size is not None:
            raise ValueError(f"--recurrent {args.recurrent} needs sync environments (--async-batch-size is set): a "
                             "recurrent state follows each environment's steps in order")
    if args.resume_replay and args.async_batch_size is not None:
        raise ValueError("--resume-replay needs sync environments: async mode's order of steps is not replayable")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.policy_backend not in ("auto", "fused", "torch"):
        raise ValueError(f"--policy-backend must be auto, fused or torch, got {args.policy_backend!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.squash not in SQUASH:
        raise ValueError(f"--squash must be one of {', '.join(SQUASH)}, got {args.squash!r}")
    if args.action_masks not in ACTION_MASKS:
        raise ValueError(f"--action-masks must be one of {', '.join(ACTION_MASKS)}, got {args.action_masks!r}")
    action_space, mask_source = probe_actions(args.env_id)
    head = action_head(action_space, args.squash)
    masked = action_masks_on(args.action_masks, head, mask_source, args.env_id)
    if masked and args.async_batch_size is not None:
        raise ValueError(f"--action-masks {args.action_masks}: the masks of {args.env_id} are read with sync "
                         "environments (--async-batch-size is set)")
    # --policy-backend fused where it cannot run fails here, before any work
    policy_backend(args, family, action_space=action_space, masked=masked)
    return args


def action_masks_on(mode: str, head: ActionHead, source: Optional[str], env_id: str) -> bool:
    """Whether a run with ``--action-masks`` ``mode`` samples among legal actions: ``off`` never;
    ``auto`` when the policy's ``head`` is categorical and the environments give masks (``source``,
    :func:`fastppo.envs.action_mask_source`); ``on`` then too, and an error (naming the flag) where
    they give none or the actions are continuous."""
    if mode not in ACTION_MASKS:
        raise ValueError(f"--action-masks must be one of {', '.join(ACTION_MASKS)}, got {mode!r}")
    if mode == "off":
        return False
    if not head.maskable:
        if mode == "on":
            raise ValueError(f"--action-masks on: masks say which Discrete or MultiDiscrete actions are legal; the "
                             f"actions of {env_id} are continuous (a {head.kind} head)")
        return False
    if source is None:
        if mode == "on":
            raise ValueError(f"--action-masks on, but {env_id} gives no action masks: its environments have neither "
                             "info['action_mask'] at reset nor an action_masks() method (use --action-masks auto or off)")
        return False
    return True


def rank_share(args: Args, world_size: int, rank: int) -> Args:
    """One rank's part of a data-parallel run of ``args`` (whose sizes are the whole run's):
    ``num_envs`` and ``async_batch_size`` divided among the ranks, the environments' seeds offset
    by the environments of the ranks before it, EnvPool's worker threads divided among the ranks'
    share of the cores. Sizes that do not divide are an error."""
    if world_size == 1:
        return args
    if args.num_envs % world_size:
        raise ValueError(f"--num-envs ({args.num_envs}) must be divisible by the world size ({world_size}): "
                         "each rank steps num_envs / world_size environments")
    local_envs, local_async = args.num_envs // world_size, None
    if args.async_batch_size is not None:
        if args.async_batch_size % world_size or not 0 < args.async_batch_size // world_size < local_envs:
            raise ValueError(f"--async-batch-size ({args.async_batch_size}) must be divisible by the world size "
                             f"({world_size}) into [1, {local_envs}) per rank (each rank has {local_envs} environments)")
        local_async = args.async_batch_size // world_size
    if recurrent_cell(args) is not None and local_envs % args.num_minibatches:
        raise ValueError(f"--num-minibatches ({args.num_minibatches}) must divide each rank's environments ({local_envs}) "
                         f"with --recurrent {args.recurrent}: each minibatch holds whole environments' rollouts")
    local_batch = (local_async or local_envs) * args.num_steps
    if local_batch % args.num_minibatches:
        raise ValueError(f"--num-minibatches ({args.num_minibatches}) must divide each rank's batch ({local_batch}): "
                         f"the batch is not divisible by the world size ({world_size}) into minibatches")
    threads = args.env_threads
    if threads is None and env_family(args.env_id) != "classic":
        threads = max(1, (os.cpu_count() or 1) // world_size)
    return dataclasses.replace(args, num_envs=local_envs, async_batch_size=local_async,
                               seed=args.seed + rank * local_envs, env_threads=threads)


def train_device(args: Args) -> torch.device:
    """The device ``--device`` resolves to (auto: CUDA when torch sees one)."""
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")


def policy_backend(args: Args, family: str, obs_shape=None, device: Optional[torch.device] = None,
                   kernels: Optional[Kernels] = None, action_space=None, masked: bool = False) -> str:
    """The backend ``--policy-backend`` resolves to: ``fused`` runs the MLP actor-critic of the
    classic and MuJoCo presets as one C++ call per rollout step and per minibatch (sync envs, CPU,
    fastppo's kernels; every head: Discrete, MultiDiscrete, Box with or without ``--squash tanh``,
    ``masked`` sampling among legal actions included), and an LSTM policy on vector observations
    (``--recurrent lstm``) as one C++ call per minibatch of whole environments (its rollout steps go
    through :func:`fastppo.recurrent.lstm_sequence`); everything else (the Atari CNN, a GRU, async
    envs, a GPU, the eager baseline's kernels) runs on ``torch``. ``action_space`` is checked as the policy takes it; ``masked`` (the environments'
    masks are on) runs on either backend. Asking for ``fused`` where it cannot run is an error that
    says why."""
    reasons = []
    if device is None:
        device = train_device(args)
    if device.type != "cpu":
        reasons.append(f"it runs on the CPU (device is {device})")
    if family == "atari" or (obs_shape is not None and len(obs_shape) != 1):
        what = "Atari frames" if family == "atari" else f"observations of shape {tuple(obs_shape)}"
        reasons.append(f"it runs MLP policies on vector observations, not {what}")
    if args.async_batch_size is not None:
        reasons.append("it runs sync environments (--async-batch-size is set)")
    if kernels is not None and kernels != Kernels():
        reasons.append("it computes with fastppo's kernels (other kernels were given)")
    if recurrent_cell(args) not in (None, "lstm"):
        reasons.append(f"its recurrent policies are LSTMs (--recurrent {args.recurrent} is set)")
    if action_space is not None:
        action_head(action_space, getattr(args, "squash", None) or "none")  # a space no head takes raises here
    if args.policy_backend == "fused" and reasons:
        raise ValueError("--policy-backend fused: " + "; ".join(reasons))
    if args.policy_backend == "torch" or reasons:
        return "torch"
    return "fused"


def recurrent_cell(args) -> Optional[str]:
    """The RNN cell of ``args``'s policy (``"lstm"``, ``"gru"``), or None for a feed-forward one
    (``--recurrent none``, or settings that were not resolved)."""
    cell = getattr(args, "recurrent", None)
    return None if cell in (None, "none") else cell
