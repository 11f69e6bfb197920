"""Shared fixtures: the devices every kernel test runs on; which fastppo the tests run against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fastppo

try:
    import torch
except ModuleNotFoundError:  # a numpy-only install: the test modules that need torch skip themselves
    torch = None

CUDA = torch is not None and fastppo.cuda_available() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build of fastppo")

# Every kernel test is generated per device: test_x[cpu], test_x[cuda] (skipped without a GPU).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[needs_cuda, pytest.mark.cuda])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(items):
    """Marks `subprocess` every test whose own code starts a process (subprocess, sys.executable):
    .ci/sanitize leaves those out, since a child process spends its time in the interpreter's
    start-up and in torch's import, which the sanitizers do not look at, not in fastppo's core."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            continue
        if "subprocess." in source or "sys.executable" in source:
            item.add_marker(pytest.mark.subprocess)


def pytest_report_header(config):
    return f"fastppo {fastppo.__version__} from {Path(fastppo.__file__).parent}"


def pytest_sessionstart(session):
    """With FASTPPO_TESTS_INSTALLED_IN=<prefix> (.ci/wheel sets it to the venv of an installed wheel),
    the run stops at once unless the fastppo it imports lies under that prefix, so the source tree's
    python/ can never stand in for the installed package."""
    prefix = os.environ.get("FASTPPO_TESTS_INSTALLED_IN")
    if prefix:
        where = Path(fastppo.__file__).resolve()
        if not where.is_relative_to(Path(prefix).resolve()):
            raise pytest.UsageError(f"FASTPPO_TESTS_INSTALLED_IN={prefix}, but the tests import fastppo from {where}")
