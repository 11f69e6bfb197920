"""pytest-benchmark's side of the micro-benchmarks (``pytest benchmarks --benchmark-only``, see
test_kernels.py): the options choosing the sizes and the device, the machine recorded in
``--benchmark-json``, and the contenders that were skipped, with the reason, recorded there too."""

from __future__ import annotations

import pytest

from benchmarks import _common as common

SKIPPED = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("fastppo benchmarks")
    group.addoption("--bench-sizes", choices=["full", "quick", "tiny"], default="full",
                    help="the scripts' sizes to time: every size (full), their --quick or their --tiny sizes "
                    "(tiny also leaves torch.compile out)")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live")


def pytest_configure(config):
    if config.getoption("--bench-device") == "cuda":
        import torch
        import fastppo

        if not (torch.cuda.is_available() and fastppo.cuda_available()):
            raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device or this fastppo build cannot "
                                    f"use one: {fastppo.build_info()}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastppo"] = common.machine_info(config.getoption("--bench-device"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = config.stash.get(SKIPPED, [])


@pytest.fixture
def skip_contender(request):
    """``skip_contender(info, reason)``: skips this test, and keeps ``info`` (the benchmark's
    extra_info) with the reason for the suite's tables (``python -m benchmarks --from-json``)."""

    def skip(info, reason):
        request.config.stash.setdefault(SKIPPED, []).append(dict(info, reason=reason))
        pytest.skip(reason)

    return skip
