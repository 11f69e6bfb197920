"""The micro-benchmarks under pytest-benchmark: one test per (kernel, size, contender), timing one
call with the ``benchmark`` fixture, after a check of that contender's outputs against the
reference's (the check is also its warm-up and, for torch.compile, its compile).

    pytest benchmarks --benchmark-only                            # every size of every kernel, CPU
    pytest benchmarks --benchmark-only --bench-sizes tiny         # smallest sizes, no torch.compile
    pytest benchmarks --benchmark-only -k "gae and 128x8"         # one kernel's case, every contender
    pytest benchmarks --benchmark-only --benchmark-json run.json  # then: python -m benchmarks --from-json run.json

Test ids read ``<kernel>-<size>-<contender>``. A contender that cannot run here (a peer that is not
installed, numpy on CUDA) is skipped with the reason, which ``--benchmark-json`` keeps.
"""

from __future__ import annotations

import gc
import re

import pytest

from benchmarks import _common as common
from benchmarks import bench_gae, bench_heads, bench_loss, bench_rlhf

MODULES = [bench_gae, bench_loss, bench_heads, bench_rlhf]
# torch.compile's first use imports inductor, whose modules warn about torch's own deprecated APIs.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\..*")


def pytest_generate_tests(metafunc):
    mode, device = metafunc.config.getoption("--bench-sizes"), metafunc.config.getoption("--bench-device")
    params = []
    for module in MODULES:
        for case in module.benchmark_cases(mode, device):
            size = "x".join(str(v) for v in case.size.values())
            params += [pytest.param(case, column, id=f"{case.kernel}-{size}-{slug(column)}") for column in case.vs]
    metafunc.parametrize(("case", "column"), params)


def slug(column):
    return re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_")


_last_built = {}  # id(case) -> (its Contenders, the reference's outputs), for the last case only


def build(case):
    """The case's Contenders and the reference's outputs, built once for all of its columns (whose
    tests run one after another); the previous case's are dropped first, to free their memory."""
    if id(case) not in _last_built:
        _last_built.clear()
        gc.collect()
        built = case.build()
        reference = built.calls[built.reference]
        reference_outputs = None if isinstance(reference, str) else built.outputs(built.reference, reference())
        _last_built[id(case)] = built, reference_outputs
    return _last_built[id(case)]


def test_kernel(benchmark, case, column, request, skip_contender):
    built, reference_outputs = build(case)
    info = dict(benchmark=case.benchmark, kernel=case.kernel, case=case.case, size=case.size, column=column,
                vs=case.vs[column])
    call = built.calls[column]
    if isinstance(call, str):
        skip_contender(info, call)
    if column != built.reference:
        outputs = built.outputs(column, call())
        warnings, _ = common.compare(outputs, reference_outputs, column, built.reference, f"{case.kernel} {case.case}",
                                     built.tolerance, built.relative)
        assert not warnings, warnings
        del outputs
    benchmark.group = f"{case.kernel} {case.case}"
    benchmark.extra_info.update(info)
    if request.config.getoption("--bench-device") == "cuda":
        import torch

        benchmark(lambda: (call(), torch.cuda.synchronize()))
    else:
        benchmark(call)
