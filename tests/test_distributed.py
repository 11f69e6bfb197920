"""Data-parallel training under torchrun: 2 CPU processes (gloo) launched by the test itself.

- `train` (both backends): parameters bit-identical on both ranks after every update, metrics from
  rank 0 alone; kill-and-resume of the 2-process run equal to the uninterrupted run;
- one update of 2 ranks equals one process holding both ranks' minibatches (global advantage
  normalization and masked means over the union), within float32 rounding;
- the merged normalization statistics equal those of the concatenated data;
- bad configurations fail before any work.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

import fastppo  # noqa: E402
from fastppo.checkpoint import CheckpointError  # noqa: E402
from fastppo.train import Args, rank_share, resolve, train  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import dist_worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str, nproc: int = 2) -> list:
    """Runs the worker on ``nproc`` ranks; returns what each rank saved."""
    out.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(fastppo.__file__).resolve().parents[1])  # the fastppo this test imported
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(WORKER), *args[:1], str(out), *args[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


TRAIN_FLAGS = ["--env-id", "CartPole-v1", "--preset", "classic", "--num-envs", "4", "--num-steps", "16",
               "--num-minibatches", "2", "--update-epochs", "2", "--total-timesteps", "640", "--checkpoint-every", "2",
               "--resume-replay"]


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_two_ranks_train_in_lockstep(tmp_path, backend):
    flags = TRAIN_FLAGS + ["--policy-backend", backend, "--run-dir", str(tmp_path / "runs"), "--run-name", "r"]
    ranks = torchrun(tmp_path / "out", "train", *flags)
    hashes = [r["hashes"] for r in ranks]
    assert len(hashes[0]) == 10 * 2 * 2  # iterations x epochs x minibatches
    assert hashes[0] == hashes[1]  # bit-identical parameters after every update
    assert len(set(hashes[0])) == len(hashes[0])  # and they did change
    lines = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10  # rank 0 alone writes
    summaries = [r["summary"] for r in ranks]
    assert summaries[0]["global_step"] == summaries[1]["global_step"] == 640
    assert summaries[0]["world_size"] == 2 and summaries[0]["episodes"] == summaries[1]["episodes"] > 0


def test_kill_and_resume_of_two_ranks_equals_the_uninterrupted_run(tmp_path):
    flags = TRAIN_FLAGS + ["--run-dir", str(tmp_path / "runs")]
    whole = torchrun(tmp_path / "whole", "train", *flags, "--run-name", "whole")
    torchrun(tmp_path / "first", "train", *flags, "--run-name", "cut", "--stop-after=4")
    resumed = torchrun(tmp_path / "second", "train", "--resume", str(tmp_path / "runs" / "cut"))
    assert resumed[0]["hashes"] == whole[0]["hashes"][-len(resumed[0]["hashes"]):]
    assert resumed[1]["hashes"] == resumed[0]["hashes"]
    cut = (tmp_path / "runs" / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(cut) == 10
    with pytest.raises(CheckpointError, match="same world size"):
        train(Args(), resume=str(tmp_path / "runs" / "cut"))  # one process, a 2-rank checkpoint


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_one_update_of_two_ranks_equals_one_process_with_both_minibatches(tmp_path, backend):
    ranks = torchrun(tmp_path, "update", backend)
    agent, batch = dist_worker.update_problem()
    single = dist_worker.one_update(agent, batch, torch.arange(batch["obs"].shape[0]), backend)
    for rank in ranks:
        for got, want in zip(rank["params"], single):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    sel = batch["advantages"][batch["real"]].double()
    want = torch.stack([sel.new_tensor(float(sel.numel())), sel.mean(), ((sel - sel.mean()) ** 2).sum()])
    torch.testing.assert_close(ranks[0]["moments"], want)
    assert torch.equal(ranks[0]["moments"], ranks[1]["moments"])


CLOSE_ENDS_THE_GROUP = """
import os, torch
from fastppo.distributed import Group

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]

group = Group("cpu")
torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])  # imports torch.distributed.nn (through torch._dynamo)
for _ in range(20):
    group.sum([1.0])
model = group.shard(torch.nn.Linear(2, 2))
model(torch.ones(1, 2)).sum().backward()
[p.full_tensor() for p in model.parameters()]  # torch's DTensor caches now hold the mesh
del model
assert gloo_threads(), "gloo started no thread: nothing to check"
group.close()
assert not gloo_threads(), gloo_threads()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the threads in /proc")
def test_close_ends_the_group_and_its_threads():
    """After ``Group.close()`` no gloo thread is left for the interpreter's shutdown, where one that
    drops its last collective's tensor takes the GIL, is ended by pthread_exit and aborts the process
    ("terminate called without an active exception"). Neither an optimizer made once the group
    exists (its constructor imports torch.distributed.nn, whose default arguments hold the group they
    see) nor a model sharded over it (torch's DTensor caches keep its device mesh, which holds the
    group) may keep the group alive."""
    package_root = str(Path(fastppo.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CLOSE_ENDS_THE_GROUP], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_merged_normalization_statistics_equal_those_of_the_concatenated_data(tmp_path):
    ranks = torchrun(tmp_path, "stats")
    obs = np.concatenate([dist_worker.stats_problem(r)[0] for r in range(2)], axis=1)  # [steps, 2N, D]
    rewards = np.concatenate([dist_worker.stats_problem(r)[1] for r in range(2)], axis=1)
    flat = obs.reshape(-1, obs.shape[-1])
    returns, g = [], np.zeros(rewards.shape[1])
    for r in rewards:
        g = 0.9 * g + r
        returns.append(g.copy())
    returns = np.concatenate(returns)
    for rank in ranks:
        count, mean, m2 = rank["obs"]
        assert count[0] == flat.shape[0]
        np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m2, ((flat - flat.mean(0)) ** 2).sum(0), rtol=1e-10)
        count, mean, m2 = rank["ret"]
        assert count[0] == returns.size
        np.testing.assert_allclose(mean, [returns.mean()], rtol=1e-12)
        np.testing.assert_allclose(m2, [((returns - returns.mean()) ** 2).sum()], rtol=1e-10)
    for a, b in zip(ranks[0]["obs"] + ranks[0]["ret"], ranks[1]["obs"] + ranks[1]["ret"]):
        np.testing.assert_array_equal(a, b)  # every rank normalizes with the same bits


def test_bad_configurations_fail_fast():
    args = resolve(Args(env_id="CartPole-v1", preset="classic", num_envs=4))
    with pytest.raises(ValueError, match="divisible by the world size"):
        rank_share(args, 3, 0)
    with pytest.raises(ValueError, match="must divide each rank's batch"):
        rank_share(resolve(Args(env_id="CartPole-v1", preset="classic", num_envs=4, num_steps=3,
                                num_minibatches=4)), 2, 0)
    with pytest.raises(ValueError, match="async-batch-size"):
        rank_share(resolve(Args(env_id="CartPole-v1", preset="classic", num_envs=8, async_batch_size=3)), 2, 0)
    share = rank_share(resolve(Args(env_id="HalfCheetah-v5", num_envs=4)), 2, 1)
    assert (share.num_envs, share.seed) == (2, 1 + 2)
    assert share.env_threads == max(1, (os.cpu_count() or 1) // 2)
    assert rank_share(args, 1, 0) is args


RLHF_FLAGS = ["--sft-steps", "20", "--rm-pairs", "64", "--rm-heldout-pairs", "32", "--rm-epochs", "1",
              "--batch-size", "8", "--checkpoint-every", "1", "--no-compare-kl-off", "--no-plot"]


def test_rlhf_two_ranks_in_lockstep_and_kill_and_resume(tmp_path):
    whole = torchrun(tmp_path / "whole", "rlhf", "--run-dir", str(tmp_path / "whole_run"), "--iterations", "3",
                     *RLHF_FLAGS)
    assert whole[0]["code"] == whole[1]["code"] == 0
    ppo = 3 * 4 * 2  # iterations x epochs x minibatches; rank 0 also made the stages (SFT, reward model) before
    assert len(whole[1]["hashes"]) == ppo and len(whole[0]["hashes"]) > ppo
    assert whole[0]["hashes"][-ppo:] == whole[1]["hashes"]
    metrics = (tmp_path / "whole_run" / "kl" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3
    torchrun(tmp_path / "first", "rlhf", "--run-dir", str(tmp_path / "cut_run"), "--iterations", "1", *RLHF_FLAGS)
    resumed = torchrun(tmp_path / "second", "rlhf", "--run-dir", str(tmp_path / "cut_run"), "--iterations", "3",
                       "--resume", *RLHF_FLAGS)
    assert len(resumed[0]["hashes"]) == 2 * 4 * 2  # the stages were loaded
    assert resumed[0]["hashes"] == whole[1]["hashes"][-16:] == resumed[1]["hashes"]
    assert (tmp_path / "cut_run" / "kl" / "metrics.jsonl").read_text() == "\n".join(metrics) + "\n"


@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_rlhf_one_update_of_two_ranks_equals_one_process_with_both_halves(tmp_path, sharding):
    """Replicated models with averaged gradients, or FSDP2-sharded ones (gathered whole here)."""
    ranks = torchrun(tmp_path, "rlhf_update", sharding)
    trainer, full = dist_worker.rlhf_problem(16)
    trainer.update(full, orders=[torch.arange(16)])
    single = dist_worker.trained_params(trainer)
    for rank in ranks[:1] if sharding == "fsdp" else ranks:  # FSDP's full state is gathered on rank 0
        assert len(rank["params"]) == len(single)
        for got, want in zip(rank["params"], single):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if sharding == "replicated":
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


def test_rlhf_fsdp_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    """Each rank's shards after the last step of a resumed FSDP run equal the uninterrupted run's."""
    flags = ["--fsdp", *RLHF_FLAGS]
    whole = torchrun(tmp_path / "whole", "rlhf", "--run-dir", str(tmp_path / "w"), *flags, "--iterations", "2")
    torchrun(tmp_path / "first", "rlhf", "--run-dir", str(tmp_path / "c"), *flags, "--iterations", "1")
    resumed = torchrun(tmp_path / "second", "rlhf", "--run-dir", str(tmp_path / "c"), *flags, "--iterations", "2",
                       "--resume")
    assert all(r["code"] == 0 for r in whole + resumed)
    for rank in range(2):
        assert resumed[rank]["hashes"][-1] == whole[rank]["hashes"][-1]
    assert whole[0]["hashes"][-1] != whole[1]["hashes"][-1]  # the ranks hold different shards
    assert (tmp_path / "c" / "kl" / "metrics.jsonl").read_text() == (tmp_path / "w" / "kl" / "metrics.jsonl").read_text()
