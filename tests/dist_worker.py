"""What each rank runs in tests/test_distributed.py, launched with torchrun (2 CPU processes, gloo).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py KIND OUT_DIR [ARGS...]

KIND:
- ``train``: ``fastppo.train.train`` with the flags in ARGS (``--resume DIR`` alone resumes),
  recording a hash of the parameters after every update; each rank writes ``rank{r}.pt`` with the
  hashes and its final parameters.
- ``update``: one minibatch update of the loss, on this rank's share of a batch both the test and
  the ranks build from the same seed; writes the parameters after it (``rank{r}.pt``).
- ``stats``: each rank books its share of observations / rewards in an ``EnvStepBoundary`` with
  deferred statistics, then the group merges them; writes the running statistics.
- ``rlhf``: ``fastppo.rlhf.run.main`` with the flags in ARGS, recording a hash of the trained
  parameters after every optimizer step.
- ``rlhf_update``: one RLHF PPO update on this rank's half of a rollout both the test and the ranks
  build from the same seed; writes the trained parameters after it.
"""

import hashlib
from dataclasses import asdict
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fastppo.distributed import Group
from fastppo.envstep import EnvStepBoundary
from fastppo.learner import Batch, Learner
from fastppo.policy import FusedActorCritic


def params_hash(params) -> str:
    """sha1 of the parameters (this rank's shards of FSDP's DTensors)."""
    flat = torch.cat([getattr(p, "_local_tensor", p).detach().reshape(-1) for p in params])
    return hashlib.sha1(flat.numpy().tobytes()).hexdigest()


def record_updates(hashes: list) -> None:
    """Appends the parameters' hash after every optimizer step, on either backend."""
    apply_gradients, adam_step = FusedActorCritic.apply_gradients, torch.optim.Adam.step

    def fused_apply(self, *a, **k):
        apply_gradients(self, *a, **k)
        hashes.append(params_hash([self.params]))

    def torch_step(self, *a, **k):
        out = adam_step(self, *a, **k)
        hashes.append(params_hash([p for g in self.param_groups for p in g["params"]]))
        return out

    FusedActorCritic.apply_gradients, torch.optim.Adam.step = fused_apply, torch_step


def update_problem(seed: int = 0, rows: int = 64, obs_dim: int = 4):
    """A batch of ``2 * rows`` transitions (the two ranks' halves) for CleanRL's CartPole agent."""
    from fastppo.agent import Agent

    class Space:
        n, shape = 2, ()

    torch.manual_seed(seed)
    agent = Agent((obs_dim,), Space(), "classic")
    g = torch.Generator().manual_seed(seed + 1)
    n = 2 * rows
    batch = dict(obs=torch.randn(n, obs_dim, generator=g), actions=torch.randint(0, 2, (n,), generator=g),
                 logprobs=-torch.rand(n, generator=g) - 0.3, advantages=torch.randn(n, generator=g) * 2 + 0.5,
                 returns=torch.randn(n, generator=g), values=torch.randn(n, generator=g),
                 real=torch.rand(n, generator=g) > 0.2)
    return agent, batch


def one_update(agent, batch, idx, backend: str, group=None, moments=None) -> list:
    """One minibatch update (lr 1e-2, CleanRL's loss settings) on rows ``idx`` of ``batch``."""
    learner = Learner(agent, backend, lr=1e-2, eps=1e-5, max_grad_norm=0.5, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01,
                      clip_vloss=True, norm_adv=True, group=group)
    learner.set_batch(Batch(batch["obs"], batch["actions"], batch["logprobs"], batch["advantages"], batch["returns"],
                            batch["values"], batch["real"]))
    learner.minibatch(idx, group_moments=moments)
    if backend == "fused":
        return [learner.fused.params.clone()]
    return [p.detach().clone() for p in agent.parameters()]


def rlhf_problem(batch_size: int, group=None, fsdp: bool = False):
    """A PPOTrainer on small models (no stages: untrained TinyGPTs) and one rollout of ``batch_size``
    prompts; one epoch, one minibatch, two micro-batches per half of the batch. With ``fsdp`` the
    trainer returned shards its models over ``group`` (the rollout is made before, unsharded)."""
    import copy
    from fastppo.rlhf import digits as D
    from fastppo.rlhf.models import ScalarHeadModel, frozen_copy
    from fastppo.rlhf.ppo import PPOConfig, PPOTrainer

    policy = D.new_policy(0)
    critic = ScalarHeadModel(D.new_policy(1))
    rm = ScalarHeadModel(D.new_policy(2)).eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    config = PPOConfig(batch_size=batch_size, response_length=6, ppo_epochs=1, num_minibatches=1,
                       micro_batch_size=batch_size // 4, learning_rate=1e-3)
    models = copy.deepcopy((policy, critic))
    trainer = PPOTrainer(policy.eval(), frozen_copy(policy), rm, critic, D.prompts, D.EOS, D.PAD, config,
                         generator=torch.Generator().manual_seed(5))
    rollout = trainer.rollout()
    if fsdp:
        half = dict(batch_size=batch_size // group.size, micro_batch_size=batch_size // group.size // 2)
        trainer = PPOTrainer(models[0].eval(), frozen_copy(models[0]), rm, models[1], D.prompts, D.EOS, D.PAD,
                             PPOConfig(**{**asdict(config), **half}), group=group, fsdp=True)
    return trainer, rollout


def trained_params(trainer) -> list:
    """The trained parameters in order (with FSDP gathered whole: a collective)."""
    names = [name for name, _ in trainer._modules().named_parameters()]
    if trainer.fsdp:
        full = trainer.state_dict()["modules"]
        return [full[name].clone() for name in names] if full else []
    return [p.detach().clone() for _, p in trainer._modules().named_parameters()]


def stats_problem(rank: int, steps: int = 5, num_envs: int = 3, obs_dim: int = 3):
    """Rank ``rank``'s observations ``[steps, N, D]`` and rewards ``[steps, N]``."""
    g = np.random.default_rng(100 + rank)
    return g.normal(2.0, 3.0, (steps, num_envs, obs_dim)), g.normal(1.0, 2.0, (steps, num_envs))


def main(kind: str, out_dir: str, *args: str) -> None:
    out = Path(out_dir)
    if kind == "train":
        from fastppo.train import Args, train

        hashes: list = []
        record_updates(hashes)
        if args and args[0] == "--resume":
            summary = train(Args(), resume=args[1])
        else:
            import tyro

            stop = [a for a in args if a.startswith("--stop-after=")]
            flags = [a for a in args if not a.startswith("--stop-after=")]
            summary = train(tyro.cli(Args, args=flags), stop_after=int(stop[0].split("=")[1]) if stop else None)
        torch.save(dict(hashes=hashes, summary=summary), out / f"rank{os.environ['RANK']}.pt")
        return
    if kind == "rlhf":
        from fastppo.rlhf import run

        hashes: list = []
        step = torch.optim.AdamW.step

        def recorded(self, *a, **k):
            out = step(self, *a, **k)
            hashes.append(params_hash([p for g in self.param_groups for p in g["params"]]))
            return out

        torch.optim.AdamW.step = recorded
        code = run.main(list(args))
        torch.save(dict(hashes=hashes, code=code), out / f"rank{os.environ['RANK']}.pt")
        return
    group = Group("cpu")
    if kind == "rlhf_update":
        from dataclasses import replace

        fsdp = args[:1] == ("fsdp",)
        trainer, full = rlhf_problem(16, group, fsdp)
        half = 16 // group.size
        rows = slice(group.rank * half, (group.rank + 1) * half)
        if not fsdp:
            trainer.config = replace(trainer.config, batch_size=half, micro_batch_size=half // 2)
            trainer.group = group
        trainer.update(type(full)(*(x[rows] for x in full)), orders=[torch.arange(half)])
        torch.save(dict(params=trained_params(trainer)), out / f"rank{group.rank}.pt")
        del trainer, full  # FSDP's modules hold the group: close() ends it only once they are gone
    elif kind == "update":
        backend = args[0]
        agent, batch = update_problem()
        rows = batch["obs"].shape[0] // group.size
        idx = torch.arange(group.rank * rows, (group.rank + 1) * rows)
        moments = group.advantage_moments(batch["advantages"][idx][None], batch["real"][idx][None])[0]
        params = one_update(agent, batch, idx, backend, group, moments)
        torch.save(dict(params=params, moments=moments), out / f"rank{group.rank}.pt")
    elif kind == "stats":
        obs, rewards = stats_problem(group.rank)
        steps, N, D = obs.shape
        boundary = EnvStepBoundary(N, (D,), normalize_obs=True, normalize_reward=True, gamma=0.9)
        boundary.defer_stats()
        outs = [np.zeros((N, D), np.float32), np.zeros(N, np.float32)] + [np.zeros(N, np.bool_) for _ in range(3)]
        for t in range(steps):
            boundary.step(obs[t], rewards[t], np.zeros(N, bool), np.zeros(N, bool), *outs)
        group.merge_env_statistics(boundary)
        torch.save(dict(obs=(boundary.obs_count.copy(), boundary.obs_mean.copy(), boundary.obs_m2.copy()),
                        ret=(boundary.return_count.copy(), boundary.return_mean.copy(), boundary.return_m2.copy()),
                        discounted=[boundary.discounted_return.copy()]), out / f"rank{group.rank}.pt")
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
