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
