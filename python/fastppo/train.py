"""PPO on EnvPool batched environments, shaped like CleanRL's ppo.py.

The loop reads top to bottom: rollout -> GAE -> epochs of shuffled minibatches -> log ->
checkpoint. Each part has its module: the settings (``Args``, presets) in :mod:`fastppo.config`,
the ``Agent`` in :mod:`fastppo.agent`, the rollouts and their GAE in :mod:`fastppo.rollout`, the
update in :mod:`fastppo.learner`, the run folder in :mod:`fastppo.runs`. fastppo's kernels replace
lines of that loop (advantages, the clipped loss, the policy heads, the env step); they do not hide it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
import tyro

from fastppo.agent import Agent, Kernels, layer_init  # noqa: F401 (layer_init: importable from here, as before)
from fastppo.checkpoint import CheckpointError, rng_state, save_checkpoint, set_rng_state
from fastppo.config import PRESETS, Args, action_masks_on, policy_backend, rank_share, resolve, train_device
from fastppo.config import FAST_PRESET_TASKS, FromPreset  # noqa: F401 (importable from here, as before)
from fastppo.distributed import Group, in_torchrun
from fastppo.envs import action_mask_source, env_family, make_env
from fastppo.envstep import EnvStepBoundary
from fastppo.learner import UPDATE_STATS, Learner
from fastppo.progress import Progress, tensorboard_writer  # noqa: F401 (importable from here, as before)
from fastppo.track import RunLogger
from fastppo.recurrent import make_agent
from fastppo.rollout import make_collector
from fastppo.runs import (append_record, check_world_size, checkpoint_path, keep_log_until, metrics_path,
                          restore_learning, resume_state, start_run)
from fastppo.runs import PLACE_SETTINGS, check_resumed_settings, saved_args  # noqa: F401 (importable from here, as before)

__all__ = ["Agent", "Args", "Kernels", "PRESETS", "main", "make_agent", "rank_share", "resolve", "train"]


def episode_statistics(boundary: EnvStepBoundary, group: Optional[Group]) -> tuple:
    """Mean return of the recent episodes, of the last 10 (each rank's, pooled) and the episodes so far."""
    recent = [r for r, _ in boundary.recent]
    totals = [sum(recent), len(recent), sum(recent[-10:]), len(recent[-10:]), boundary.episodes]
    if group is not None:
        totals = group.sum(totals)
    return (totals[0] / totals[1] if totals[1] else None, totals[2] / totals[3] if totals[3] else None, int(totals[4]))


def explained_variance(batch) -> Optional[float]:
    """1 - Var(returns - values) / Var(returns) over the batch's real steps (None: returns constant)."""
    y_pred, y_true = batch.values[batch.mask].cpu().numpy(), batch.returns[batch.mask].cpu().numpy()
    var_y = np.var(y_true)
    return None if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)


def train(args: Args, resume: Optional[str] = None, envs=None, stop_after: Optional[int] = None,
          kernels: Kernels = Kernels()) -> dict:
    """Runs PPO with ``args`` and returns a summary (steps, seconds, recent mean return, run dir).

    ``resume``: a run directory (or its checkpoint) to continue with its saved settings (``args``
    must then be ``Args()`` or those settings: another task is a ``CheckpointError`` naming both).
    The model, optimizer, statistics, random streams and counters are restored and the
    environments start afresh; with ``--resume-replay`` the logged actions are replayed from the
    same seed, so on the CPU the continued run matches an uninterrupted one. A run directory with
    no checkpoint yet (stopped before its first) starts over with its ``config.json``. ``envs``: an
    environment object to use instead of EnvPool's (tests). ``stop_after``: stop after this many
    iterations (as if killed right after that iteration's checkpoint). ``kernels``: the
    computations to use (the benchmark suite's eager baseline).

    Under torchrun (see :mod:`fastppo.distributed`) the ranks share the run: ``args`` gives the
    whole run's sizes, each rank steps its share of the environments, and rank 0 alone writes
    the run directory.
    """
    checkpoint = source = None
    if resume is not None:
        args, checkpoint, source = resume_state(resume, args)
    args = resolve(args) if envs is None else args
    family = env_family(args.env_id) if envs is None else "classic"
    device = train_device(args)
    group = Group(device.type) if in_torchrun() else None
    K, rank, is_main = (1, 0, True) if group is None else (group.size, group.rank, group.is_main)
    run_args, args = args, rank_share(args, K, rank)  # the run's settings (saved), this rank's share
    if group is not None and kernels != Kernels():
        raise ValueError("data-parallel training runs fastppo's kernels (other kernels were given)")
    if checkpoint is not None:
        check_world_size(checkpoint, K, source)
        checkpoint = checkpoint if group is None else dict(checkpoint, **checkpoint["ranks"][rank])
    run_dir = start_run(run_args, resume, source, group)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if checkpoint is not None and "actions" not in checkpoint:  # new environments: other seeds than before
        args = dataclasses.replace(args, seed=args.seed + 7919 * checkpoint["iteration"])
    envs = make_env(args, family) if envs is None else envs
    obs_shape = envs.observation_space.shape
    agent = make_agent(args, obs_shape, envs.action_space, family, kernels).to(device)
    if group is not None:
        group.broadcast_(list(agent.state_dict().values()))  # every rank starts from rank 0's weights
        torch.manual_seed(run_args.seed + 1000003 * rank)  # and samples its own actions and minibatches
    t_setup = time.perf_counter()
    masked = action_masks_on(args.action_masks, agent.head, action_mask_source(envs), args.env_id)
    backend = policy_backend(args, family, obs_shape, device, kernels, envs.action_space, masked)
    # fused: one C++ call per rollout step and per minibatch (forward, heads, loss, backward, clip, Adam).
    learner = Learner(agent, backend, lr=args.learning_rate, eps=1e-5, max_grad_norm=args.max_grad_norm,
                      clip_coef=args.clip_coef, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
                      clip_vloss=args.clip_vloss, norm_adv=args.norm_adv, update_epochs=args.update_epochs,
                      num_minibatches=args.num_minibatches, target_kl=args.target_kl, group=group,
                      ppo_loss=kernels.ppo_loss)
    setup_seconds = time.perf_counter() - t_setup  # building the fused policy (what compiling would be)
    collector = make_collector(args, envs, agent, family, device, learner.fused, group)
    boundary = collector.boundary
    num_iterations = max(1, args.total_timesteps // (collector.batch_size * K))
    first_iteration, global_step = 1, 0
    if checkpoint is not None:
        restore_learning(checkpoint, source, agent, learner, backend,
                         f"{args.env_id} (observations {obs_shape}, actions {envs.action_space})")
        collector.resume(checkpoint)
        first_iteration, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        set_rng_state(checkpoint["rng"])
    else:
        collector.start()

    log_path = metrics_path(run_dir)
    if is_main:  # a killed run may have logged iterations after its checkpoint; a new run starts a new log
        keep_log_until(log_path, 0 if checkpoint is None else checkpoint["iteration"])
    writer = RunLogger(run_dir, run_args) if is_main else None  # TensorBoard, --track's W&B, --capture-video
    progress = Progress(num_iterations, first_iteration - 1, args.log_every if is_main else 0)
    start = time.perf_counter()
    timing = dict(env=0.0, inference=0.0, gae=0.0, learn=0.0)
    iteration = first_iteration - 1
    for iteration in range(first_iteration, num_iterations + 1):
        lr_now = args.learning_rate
        if args.anneal_lr:
            lr_now = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
        clip_now = None  # the learner's fixed clip_coef
        if getattr(args, "anneal_clip", None):
            clip_now = (1.0 - (iteration - 1.0) / num_iterations) * args.clip_coef
        global_step += collector.collect(timing) * K
        if group is not None:
            group.merge_env_statistics(boundary)
        batch = collector.batch(args.gamma, args.gae_lambda, kernels.gae, timing)
        t0 = time.perf_counter()
        mean_stats = learner.update(batch, lr_now, clip_now)
        timing["learn"] += time.perf_counter() - t0

        episodic_return, episodic_return_last10, episodes = episode_statistics(boundary, group)
        elapsed = time.perf_counter() - start
        record = dict(
            iteration=iteration, global_step=global_step,
            sps=(iteration - first_iteration + 1) * collector.batch_size / elapsed, time=elapsed,
            first_iteration=first_iteration, episodic_return=episodic_return,
            episodic_return_last10=episodic_return_last10, episodes=episodes, learning_rate=lr_now,
            explained_variance=explained_variance(getattr(batch, "rows", batch)), **dict(zip(UPDATE_STATS, mean_stats)),
            **({} if clip_now is None else dict(clip_coef=clip_now)),
            **{f"time_{k}": v for k, v in timing.items()},
        )
        if is_main:
            append_record(log_path, record)
        if writer is not None:
            writer.log(record, global_step)
            writer.capture(iteration, iteration in (num_iterations, stop_after), global_step, agent, boundary,
                           envs.action_space, family)
        ret = "n/a" if record["episodic_return"] is None else f"{record['episodic_return']:.1f}"
        progress.update(iteration, f"step {global_step} | {record['sps']:.0f} SPS | return {ret} | "
                        + " ".join(f"{k} {v:.1f}s" for k, v in timing.items()))
        if iteration % args.checkpoint_every == 0 or iteration == num_iterations or iteration == stop_after:
            # What differs between ranks (their environments' replay, statistics and random streams) is
            # saved per rank; the model and optimizer are the same on every rank.
            own = dict(boundary=boundary.state_dict(), rng=rng_state(), **collector.state())
            ranks = None if group is None else group.gather_objects(own)
            if is_main:
                save_checkpoint(checkpoint_path(run_dir), dict(
                    model=agent.state_dict(), optimizer=learner.state_dict(), policy_backend=backend,
                    args=dataclasses.asdict(run_args), iteration=iteration, global_step=global_step,
                    **(own if group is None else dict(world_size=K, ranks=ranks)),
                ))
        if iteration == stop_after:
            break
    progress.close()
    if writer is not None:
        writer.close()
    envs.close()
    episodic_return, episodic_return_last10, episodes = episode_statistics(boundary, group)
    if group is not None:
        group.close()
    return dict(global_step=global_step, iterations=iteration, seconds=time.perf_counter() - start,
                setup_seconds=setup_seconds, policy_backend=backend, world_size=K,
                episodic_return=episodic_return, episodic_return_last10=episodic_return_last10,
                episodes=episodes, run_dir=str(run_dir))


def main(argv=None) -> int:
    """``fastppo train``: a flag per ``Args`` field, or ``--resume RUN_DIR`` alone."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = None
    if "--resume" in argv:  # a run continues with its saved settings: nothing else may change
        if len(argv) != 2 or argv[0] != "--resume":
            print(f"fastppo train: error: --resume takes a run directory and no other flag, got {argv}", file=sys.stderr)
            return 2
        resume = argv[1]
    args = Args() if resume else tyro.cli(
        Args, args=argv, prog="fastppo train", config=(tyro.conf.DisallowNone,),
        description=__doc__.splitlines()[0] + " --resume RUN_DIR (alone) continues a run with its saved settings.")
    try:
        summary = train(args, resume=resume)
    except (ValueError, CheckpointError) as err:
        print(f"fastppo train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
