"""PPO on EnvPool batched environments, shaped like CleanRL's ppo.py.

The loop reads top to bottom: an ``Args`` dataclass (tyro makes each field a flag and the docstring
line under it its help), ``make_env``, an ``Agent`` with ``get_value`` / ``get_action_and_value``,
then rollout -> GAE -> epochs of shuffled minibatches. fastppo's kernels replace lines of that loop
(advantages, the clipped loss, the policy heads); they do not hide it.

EnvPool resets an environment on the step *after* it ends: that step ignores the action and
returns the reset observation with reward 0. Those steps are stored like the others and masked out
of the loss, and because the observation stored after a truncated step is the final observation,
``fastppo.gae`` bootstraps truncations exactly (``terminated`` apart from ``dones``).
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
import torch.nn as nn
import tyro

from fastppo.agent import Agent, Kernels, layer_init  # noqa: F401 (layer_init: importable from here, as before)
from fastppo.config import PRESETS, Args, policy_backend, rank_share, resolve, train_device
from fastppo.config import FAST_PRESET_TASKS, FromPreset  # noqa: F401 (importable from here, as before)
from fastppo.distributed import Group, in_torchrun
from fastppo.checkpoint import CheckpointError, rng_state, save_checkpoint, set_rng_state
from fastppo.envs import AsyncRollout, env_family, episode_bookkeeping, make_env, rollout_advantages
from fastppo.envstep import EnvStepBoundary
from fastppo.progress import Progress, tensorboard_writer
from fastppo.runs import (append_record, check_world_size, checkpoint_path, keep_log_until, metrics_path,
                          restore_learning, resume_state, start_run)
from fastppo.runs import PLACE_SETTINGS, check_resumed_settings, saved_args  # noqa: F401 (importable from here, as before)

__all__ = ["Agent", "Args", "Kernels", "PRESETS", "main", "rank_share", "resolve", "train"]

# A minibatch update's stats by name: PPOLossOutput's fields after the loss, FusedActorCritic.update's row (+ grad norm).
UPDATE_STATS = ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac")


def episode_statistics(boundary: EnvStepBoundary, group: Optional[Group]) -> tuple:
    """Mean return of the recent episodes, of the last 10 (each rank's, pooled) and the episodes so far."""
    recent = [r for r, _ in boundary.recent]
    totals = [sum(recent), len(recent), sum(recent[-10:]), len(recent[-10:]), boundary.episodes]
    if group is not None:
        totals = group.sum(totals)
    return (totals[0] / totals[1] if totals[1] else None, totals[2] / totals[3] if totals[3] else None, int(totals[4]))

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

    fresh_resume = checkpoint is not None and "actions" not in checkpoint
    if fresh_resume:  # new environments: other seeds than the episodes before the checkpoint had
        args = dataclasses.replace(args, seed=args.seed + 7919 * checkpoint["iteration"])
    envs = make_env(args, family) if envs is None else envs
    obs_shape = envs.observation_space.shape
    continuous = len(envs.action_space.shape) > 0
    agent = Agent(obs_shape, envs.action_space, family, kernels).to(device)
    if group is not None:
        group.broadcast_(list(agent.state_dict().values()))  # every rank starts from rank 0's weights
        torch.manual_seed(run_args.seed + 1000003 * rank)  # and samples its own actions and minibatches
    t_setup = time.perf_counter()
    backend = policy_backend(args, family, obs_shape, device, kernels)
    fused, optimizer = None, None
    if backend == "fused":
        # One C++ call per rollout step and per minibatch (forward, heads, loss, backward, clip, Adam).
        from fastppo.policy import FusedActorCritic

        fused = FusedActorCritic(agent, lr=args.learning_rate, eps=1e-5, max_grad_norm=args.max_grad_norm,
                                 clip_coef=args.clip_coef, vf_coef=args.vf_coef, ent_coef=args.ent_coef,
                                 clip_vloss=args.clip_vloss, norm_adv=args.norm_adv)
        if continuous:
            fused.set_action_bounds(envs.action_space.low, envs.action_space.high)
    setup_seconds = time.perf_counter() - t_setup  # building the fused policy (what compiling would be)
    if fused is None:
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    lr_now = args.learning_rate
    mujoco = family == "mujoco"
    boundary = EnvStepBoundary(args.num_envs, obs_shape, normalize_obs=mujoco, normalize_reward=mujoco, gamma=args.gamma)
    if group is not None:
        boundary.defer_stats()  # the ranks' statistics are merged after each rollout, so all normalize alike

    batch_size = (args.async_batch_size or args.num_envs) * args.num_steps
    minibatch_size = batch_size // args.num_minibatches

    def minibatch_moments(order: torch.Tensor) -> torch.Tensor:
        """The group's advantage moments of each minibatch of this epoch's order, [num_minibatches, 3]."""
        shape = (args.num_minibatches, minibatch_size)
        return group.advantage_moments(b_advantages[order].view(shape), b_real[order].view(shape))

    def group_mean(value: float) -> float:
        return value if group is None else group.sum([value])[0] / K
    num_iterations = max(1, args.total_timesteps // (batch_size * K))
    T, N = args.num_steps, args.num_envs
    # Rollout storage in host memory, written by the env boundary; the torch views share it on
    # the CPU and are copied once per rollout to a GPU.
    # On a GPU the observations live in pinned host memory, so the per-step copies are asynchronous.
    obs_np = torch.zeros((T + 1, N) + obs_shape, dtype=torch.uint8 if family == "atari" else torch.float32,
                         pin_memory=device.type == "cuda").numpy()
    reward_np = np.zeros((T, N), np.float32)
    done_np, term_np, real_np = (np.zeros((T, N), np.bool_) for _ in range(3))
    action_shape = envs.action_space.shape
    B = args.async_batch_size
    slots = (T, N) if B is None else (T * B,)
    actions = torch.zeros(slots + action_shape, dtype=torch.float32 if continuous else torch.int64, device=device)
    logprobs = torch.zeros(slots, device=device)
    values = torch.zeros(slots, device=device)
    action_log: list = []  # with --resume-replay: the actions sent to the environments, one [T, N, ...] array per iteration

    def to_env(action: torch.Tensor) -> np.ndarray:
        a = action.cpu().numpy()
        return np.clip(a, envs.action_space.low, envs.action_space.high) if continuous else a.astype(np.int32)

    if fused is not None:
        boundary.bind_rollout(obs_np, reward_np, done_np, term_np, real_np)
    first_iteration, global_step = 1, 0
    async_rollout = None
    if args.async_batch_size is not None:
        async_rollout = AsyncRollout(envs, boundary, family, T, args.async_batch_size, obs_shape, obs_np.dtype, device)
        raw_obs = None
    else:
        raw_obs, _ = envs.reset()
    if checkpoint is not None and not fresh_resume:
        # --resume-replay: bring the environments back to the checkpoint by replaying every logged action.
        logged = np.asarray(checkpoint["actions"])
        for a in logged:
            raw_obs, *_ = envs.step(a)
        if not np.array_equal(np.asarray(raw_obs), np.asarray(checkpoint["raw_obs"])):
            raise CheckpointError(f"replaying {len(logged)} logged steps did not reproduce the environments' state")
        action_log = [np.asarray(logged)]
    if checkpoint is not None:
        restore_learning(checkpoint, source, agent, fused or optimizer, backend,
                         f"{args.env_id} (observations {obs_shape}, actions {envs.action_space})")
        if fresh_resume:  # the statistics carry over; the environments' episodes start afresh
            boundary.load_statistics(checkpoint["boundary"])
            if async_rollout is None:
                boundary.prime(raw_obs, obs_np[0])
        else:
            boundary.load_state_dict(checkpoint["boundary"])
            obs_np[0] = checkpoint["next_obs"]
        first_iteration, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        set_rng_state(checkpoint["rng"])
    elif async_rollout is None:
        boundary.prime(raw_obs, obs_np[0])  # the reset observation is no transition: nothing is booked

    log_path = metrics_path(run_dir)
    if is_main:  # a killed run may have logged iterations after its checkpoint; a new run starts a new log
        keep_log_until(log_path, 0 if checkpoint is None else checkpoint["iteration"])
    writer = tensorboard_writer(run_dir) if is_main else None
    progress = Progress(num_iterations, first_iteration - 1, args.log_every if is_main else 0)
    start = time.perf_counter()
    timing = dict(env=0.0, inference=0.0, gae=0.0, learn=0.0)
    iteration = first_iteration - 1
    for iteration in range(first_iteration, num_iterations + 1):
        if args.anneal_lr:
            lr_now = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
            if optimizer is not None:
                optimizer.param_groups[0]["lr"] = lr_now
        if async_rollout is None and fused is not None:
            # The whole rollout's sampling noise in one call; each step is one call into the fused policy,
            # which writes the action, log-prob and value into the rollout and the env's action beside them.
            noise = (torch.randn if continuous else torch.rand)((T, N, fused.n_out))
            env_actions = np.zeros((T, N) + action_shape, np.float32 if continuous else np.int32)
            act_step = fused.bind_rollout(obs_np, noise, actions, logprobs, values, env_actions)
            env_step, perf_counter = envs.step, time.perf_counter
            for step in range(T):
                t0 = perf_counter()
                act_step(step)
                t1 = perf_counter()
                raw_obs, reward, term, trunc, info = env_step(env_actions[step])
                boundary.step_at(step, raw_obs, reward, term, trunc)
                timing["env"] += perf_counter() - t1
                timing["inference"] += t1 - t0
            global_step += T * N * K
            if args.resume_replay:
                action_log.append(env_actions)
        elif async_rollout is None:
            obs_t = torch.from_numpy(obs_np)
            env_actions = np.zeros((T, N) + action_shape, np.float32 if continuous else np.int32)
            if args.resume_replay:
                action_log.append(env_actions)
            for step in range(T):
                global_step += N * K
                t0 = time.perf_counter()
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(obs_t[step].to(device, non_blocking=True))
                values[step], actions[step], logprobs[step] = value, action, logprob
                env_action = env_actions[step] = to_env(action)
                t1 = time.perf_counter()
                raw_obs, reward, term, trunc, info = envs.step(env_action)
                boundary.step(raw_obs, reward, term, trunc, obs_np[step + 1], reward_np[step], done_np[step],
                              term_np[step], real_np[step], **episode_bookkeeping(family, term, trunc, info))
                timing["env"] += time.perf_counter() - t1
                timing["inference"] += t1 - t0

        if group is not None:
            group.merge_env_statistics(boundary)
        if async_rollout is None:
            t0 = time.perf_counter()
            obs_t = torch.from_numpy(obs_np)
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
                global_step += len(ids) * K
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
        if fused is not None:
            # Each minibatch is one call: forward, heads, clipped loss, backward, grad clip and Adam.
            fused.set_batch(b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values, b_real)
            stats_np = np.zeros((args.update_epochs * args.num_minibatches, len(UPDATE_STATS) + 1))
            done_updates = 0
            for epoch in range(args.update_epochs):
                order = torch.randperm(batch_size)
                moments = None if group is None else minibatch_moments(order)
                for i, start_ in enumerate(range(0, batch_size, minibatch_size)):
                    stats_at = stats_np.ctypes.data + stats_np.strides[0] * done_updates
                    if group is None:
                        fused.update_at(minibatch_size, order.data_ptr() + 8 * start_, lr_now, stats_at)
                    else:  # gradients, their mean over the ranks, then the clip and Adam step
                        fused.update_at(minibatch_size, order.data_ptr() + 8 * start_, lr_now, stats_at,
                                        moments[i].data_ptr(), K, apply_step=False)
                        group.average_([fused.grads])
                        fused.apply_at(lr_now, stats_at)
                    done_updates += 1
                if args.target_kl is not None and group_mean(stats_np[done_updates - 1, UPDATE_STATS.index("approx_kl")]) > args.target_kl:
                    break
            mean_stats = stats_np[:done_updates, :len(UPDATE_STATS)].mean(0).tolist()
        stats = []
        for epoch in range(args.update_epochs) if fused is None else ():
            order = torch.randperm(batch_size, device=device)
            moments = None if group is None else minibatch_moments(order)
            for i, start_ in enumerate(range(0, batch_size, minibatch_size)):
                mb = order[start_:start_ + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                out = kernels.ppo_loss(newlogprob, b_logprobs[mb], b_advantages[mb], newvalue, b_values[mb],
                                       b_returns[mb], entropy, mask=b_real[mb], clip_coef=args.clip_coef,
                                       vf_coef=args.vf_coef, ent_coef=args.ent_coef, clip_vloss=args.clip_vloss,
                                       norm_adv=args.norm_adv, **({} if group is None else dict(
                                           group_moments=moments[i], group_size=K)))
                optimizer.zero_grad()
                out.loss.backward()
                if group is not None:
                    group.average_([p.grad for p in agent.parameters()])
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append(torch.stack([getattr(out, name) for name in UPDATE_STATS]))
            if args.target_kl is not None and group_mean(out.approx_kl.item()) > args.target_kl:
                break
        obs_np[0] = obs_np[T]
        timing["learn"] += time.perf_counter() - t0

        if fused is None:
            mean_stats = torch.stack(stats).mean(0).tolist()
        if group is not None:
            mean_stats = [x / K for x in group.sum(mean_stats)]
        episodic_return, episodic_return_last10, episodes = episode_statistics(boundary, group)
        y_pred, y_true = b_values[b_real].cpu().numpy(), b_returns[b_real].cpu().numpy()
        var_y = np.var(y_true)
        explained_var = None if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        elapsed = time.perf_counter() - start
        record = dict(
            iteration=iteration, global_step=global_step, sps=(iteration - first_iteration + 1) * batch_size / elapsed,
            time=elapsed, first_iteration=first_iteration, episodic_return=episodic_return,
            episodic_return_last10=episodic_return_last10, episodes=episodes, learning_rate=lr_now,
            explained_variance=explained_var,
            **dict(zip(UPDATE_STATS, mean_stats)),
            **{f"time_{k}": v for k, v in timing.items()},
        )
        if is_main:
            append_record(log_path, record)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "global_step", "first_iteration"):
                    writer.add_scalar(key, value, global_step)
        ret = "n/a" if record["episodic_return"] is None else f"{record['episodic_return']:.1f}"
        progress.update(iteration, f"step {global_step} | {record['sps']:.0f} SPS | return {ret} | "
                        + " ".join(f"{k} {v:.1f}s" for k, v in timing.items()))
        if iteration % args.checkpoint_every == 0 or iteration == num_iterations or iteration == stop_after:
            # What differs between ranks (their environments' replay, statistics and random streams) is
            # saved per rank; the model and optimizer are the same on every rank.
            own = dict(boundary=boundary.state_dict(), rng=rng_state())
            if args.resume_replay:  # what an exact resume replays (grows with the run)
                own.update(actions=np.concatenate(action_log) if action_log else np.zeros((0, N) + action_shape),
                           raw_obs=np.asarray(raw_obs), next_obs=obs_np[0].copy())
            ranks = None if group is None else group.gather_objects(own)
            if is_main:
                save_checkpoint(checkpoint_path(run_dir), dict(
                    model=agent.state_dict(), optimizer=(fused or optimizer).state_dict(), policy_backend=backend,
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
