"""Shared fixtures: the devices every kernel test runs on."""

from __future__ import annotations

import pytest
import torch

import fastppo

CUDA = fastppo.cuda_available() and torch.cuda.is_available()
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
