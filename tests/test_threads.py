"""The CPU loops' threads: the runtime the build names, FASTPPO_NUM_THREADS, results that do not
depend on the thread count, calls from several Python threads, and a child process after fork."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastppo
from fastppo import _C

from references import rollout

# Child processes run without the sanitizer runtimes .ci/sanitize preloads, and without a thread
# count inherited from the caller's environment.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FASTPPO_NUM_THREADS", "OMP_NUM_THREADS")}
RUNTIME = _C.build_info()["thread_runtime"]
needs_threads = pytest.mark.skipif(RUNTIME == "none", reason="a build without a thread runtime runs on one thread")


def run_child(code: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=dict(BASE_ENV, **env))


def test_build_names_its_thread_runtime_and_links_accordingly():
    raw = _C.build_info()
    info = fastppo.build_info()
    ldd = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True, env=BASE_ENV).stdout
    links_openmp = any(name in ldd for name in ("libgomp", "libomp", "libiomp"))
    assert links_openmp == (raw["thread_runtime"] == "openmp"), ldd
    if raw["thread_runtime"] == "openmp":
        library = raw["thread_runtime_library"]
        assert os.path.isfile(library) and "omp" in os.path.basename(library), library
        assert f"OpenMP {raw['openmp_version']} ({os.path.basename(library)}) with {raw['threads']} threads" in info
    elif raw["thread_runtime"] == "pool":
        assert raw["thread_runtime_library"] is None and not raw["openmp"]
        assert f"thread pool with {raw['threads']} threads" in info
    else:
        assert raw["threads"] == 1 and "no OpenMP (1 thread)" in info


@needs_threads
def test_fastppo_num_threads_sets_the_count_over_omp_num_threads():
    code = "import fastppo; print(fastppo._C.build_info()['threads'])"
    assert run_child(code, FASTPPO_NUM_THREADS="3", OMP_NUM_THREADS="2").stdout.split() == ["3"]
    assert run_child(code, OMP_NUM_THREADS="2").stdout.split() == ["2"]


@pytest.mark.parametrize("value", ["0", "two", "-1", "2.5", "5000"])
def test_a_bad_fastppo_num_threads_fails_the_import_naming_it(value):
    result = run_child("import fastppo", FASTPPO_NUM_THREADS=value)
    assert result.returncode != 0
    assert f"FASTPPO_NUM_THREADS must be an integer from 1 to 4096 (or unset), got '{value}'" in result.stderr


# Each kernel at sizes above its parallel threshold (kParallelElements = 2^15 elements): GAE over
# environments (time-major), over rows (batch-major) and in horizon chunks (one environment and a
# long horizon: the step-by-step loop on one thread, one group of chunks per thread on two), and
# ppo_loss forward and backward, flat and [rows, tokens] with a mask (where torch is installed).
KERNELS = """
import sys
import numpy as np
import fastppo
sys.path.insert(0, sys.argv[1])
from references import rollout

out = {"threads": np.array(fastppo._C.build_info()["threads"])}
for name, (T, N) in {"time": (128, 1000), "chunked": (40000, 1)}.items():
    r, v, d, term, last = rollout(T, N, seed=T)
    for dtype in ("f8", "f4"):
        adv, ret = fastppo.gae(r.astype(dtype), v.astype(dtype), d, last.astype(dtype), terminated=term)
        out[f"gae_{name}_{dtype}"] = np.stack([adv, ret])
r, v, d, term, last = rollout(128, 1000, seed=5)
adv, ret = fastppo.gae(np.ascontiguousarray(r.T).T, np.ascontiguousarray(v.T).T, np.ascontiguousarray(d.T).T, last,
                       terminated=np.ascontiguousarray(term.T).T)
out["gae_batch_major"] = np.stack([adv, ret])

try:
    import torch
except ImportError:  # a numpy-only install: the GAE cases alone
    torch = None
for name, shape in ({"flat": (100_003,), "rows": (64, 1601)} if torch is not None else {}).items():
    g = torch.Generator().manual_seed(len(shape))
    t = lambda: torch.randn(shape, generator=g)
    new_logprob, new_value, entropy = (t() * 0.1).requires_grad_(), t().requires_grad_(), t().abs().requires_grad_()
    mask = torch.rand(shape, generator=g) < 0.9 if name == "rows" else None
    o = fastppo.ppo_loss(new_logprob, t() * 0.1, t(), new_value, t(), t(), entropy, mask=mask, ent_coef=0.01)
    o.loss.backward()
    out[f"loss_{name}"] = o.loss.detach().numpy()
    for x, key in ((new_logprob, "logprob"), (new_value, "value"), (entropy, "entropy")):
        out[f"loss_{name}_grad_{key}"] = x.grad.numpy()

# The fused actor-critic's updates: a recurrent one (its actor's and critic's branches, one per
# thread on two) and a 256-256 MLP one (its larger products split over the threads).
try:
    import gymnasium as gym
except ImportError:
    gym = None
if torch is not None and gym is not None:
    from fastppo.agent import Agent
    from fastppo.policy import FusedActorCritic
    from fastppo.recurrent import RecurrentAgent

    for name in ("lstm", "mlp"):
        torch.manual_seed(3)
        if name == "lstm":
            agent, (T, N) = RecurrentAgent((3,), gym.spaces.Discrete(3), "classic", "lstm", hidden_size=32), (16, 4)
        else:
            from fastppo.agent import MlpShape

            agent, (T, N) = Agent((3,), gym.spaces.Discrete(3), "classic", mlp=MlpShape(hidden_sizes=(256, 256))), (16, 4)
        fused = FusedActorCritic(agent, lr=1e-2)
        g = torch.Generator().manual_seed(4)
        B = T * N
        fused.set_batch(torch.randn(B, 3, generator=g), torch.randint(0, 3, (B,), generator=g),
                        -torch.rand(B, generator=g) - 0.5, torch.randn(B, generator=g), torch.randn(B, generator=g),
                        torch.randn(B, generator=g))
        if name == "lstm":
            starts = torch.rand(T, N, generator=g) < 0.2
            state = torch.randn(4, N, 32, generator=g)
            fused.set_sequences(starts, state)
        stats = [fused.update(torch.arange(B)) for _ in range(3)]
        out[f"fused_{name}_stats"] = np.stack(stats)
        out[f"fused_{name}_params"] = fused.params.numpy().copy()
np.savez(sys.argv[2], **out)
"""


@needs_threads
def test_results_are_the_same_bits_on_one_thread_and_on_two(tmp_path):
    tests = str(pathlib.Path(__file__).parent)
    results = {}
    for threads in ("1", "2"):
        path = tmp_path / f"threads{threads}.npz"
        child = subprocess.run([sys.executable, "-c", KERNELS, tests, str(path)], capture_output=True, text=True,
                               timeout=240, env=dict(BASE_ENV, FASTPPO_NUM_THREADS=threads))
        assert child.returncode == 0, child.stderr
        results[threads] = dict(np.load(path))
    assert results["1"].pop("threads") == 1 and results["2"].pop("threads") == 2
    assert results["1"].keys() == results["2"].keys()
    for key, one in results["1"].items():
        two = results["2"][key]
        assert one.dtype == two.dtype and one.shape == two.shape, key
        assert one.tobytes() == two.tobytes(), f"{key} differs between 1 and 2 threads"


@needs_threads
def test_the_fused_step_flushes_subnormals_only_inside_its_calls():
    """The fused actor-critic's calls flush subnormal numbers to zero (for speed, see
    cpu_vec_math.inc); the caller's floating-point mode is back after each call, on the calling
    thread and on the threads of later parallel kernels, which still read and make subnormals."""
    torch = pytest.importorskip("torch")
    gym = pytest.importorskip("gymnasium")
    from fastppo.policy import FusedActorCritic
    from fastppo.recurrent import RecurrentAgent

    T, N = 128, 1000  # GAE above its parallel threshold: on every thread
    rewards = np.full((T, N), 1e-39, np.float32)  # subnormal
    zeros = np.zeros((T, N), np.float32)

    def subnormals_survive():
        assert np.float32(1e-38) * np.float32(0.5) != 0
        assert (torch.full((4,), 1e-38) * 0.5 != 0).all()
        adv, _ = fastppo.gae(rewards, zeros, np.zeros((T, N), np.bool_), np.zeros(N, np.float32), gamma=0.0)
        assert (adv == rewards).all()  # gamma 0: each advantage is its reward, read and written as is

    subnormals_survive()
    torch.manual_seed(0)
    agent = RecurrentAgent((3,), gym.spaces.Discrete(3), "classic", "lstm", hidden_size=8)
    fused = FusedActorCritic(agent)
    B = 8 * 4
    fused.set_batch(torch.randn(B, 3), torch.randint(0, 3, (B,)), -torch.rand(B) - 0.5, torch.randn(B),
                    torch.randn(B), torch.randn(B))
    fused.set_sequences(torch.zeros(8, 4, dtype=torch.bool), torch.zeros(4, 4, 8))
    fused.update(torch.arange(B))
    fused.act(torch.randn(4, 3), torch.rand(4, 3), state=torch.zeros(4, 4, 8))
    subnormals_survive()


def test_calls_from_several_python_threads_at_once_match_one_at_a_time():
    # The kernels release the GIL: four Python threads call them together (each kernel parallel
    # on its own); every result must equal the same call made alone.
    cases = [rollout(128, 600, seed=s) for s in range(4)]
    alone = [fastppo.gae(r, v, d, last, terminated=term) for r, v, d, term, last in cases]
    results = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def work(i):
        r, v, d, term, last = cases[i]
        start.wait()
        results[i] = [fastppo.gae(r, v, d, last, terminated=term) for _ in range(20)]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, (adv, ret) in enumerate(alone):
        for got_adv, got_ret in results[i]:
            assert got_adv.tobytes() == adv.tobytes() and got_ret.tobytes() == ret.tobytes(), i


@pytest.mark.skipif(RUNTIME != "pool", reason="fastppo's pool only: GNU libgomp's threads do not survive fork "
                    "(a child that starts a parallel region after its parent ran one waits forever)")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_after_fork_runs_parallel_kernels():
    # The parent's threads do not exist in a forked child: the child's first parallel call must
    # start its own instead of waiting forever on the parent's (the alarm ends a child that hangs).
    code = """
        import os, signal, sys
        import numpy as np
        import fastppo
        sys.path.insert(0, sys.argv[1])
        from references import rollout
        r, v, d, term, last = rollout(128, 1000, seed=3)
        before, _ = fastppo.gae(r, v, d, last, terminated=term)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            adv, _ = fastppo.gae(r, v, d, last, terminated=term)
            os._exit(0 if adv.tobytes() == before.tobytes() else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        adv, _ = fastppo.gae(r, v, d, last, terminated=term)
        assert adv.tobytes() == before.tobytes()
        print("ok")
    """
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(pathlib.Path(__file__).parent)],
                           capture_output=True, text=True, timeout=120, env=dict(BASE_ENV, FASTPPO_NUM_THREADS="2"))
    assert child.returncode == 0 and child.stdout.split() == ["ok"], child.stderr
