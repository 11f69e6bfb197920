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
