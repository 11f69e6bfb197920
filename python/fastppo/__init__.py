"""fastppo: Proximal Policy Optimization with fused C++/CUDA kernels.

Public API: :func:`gae` (numpy or torch), :func:`ppo_loss`, the policy heads
(:func:`categorical_logprob_entropy`, masked or not, :func:`multi_categorical_logprob_entropy`,
:func:`normal_logprob_entropy`, :func:`tanh_normal_logprob_entropy`) and their samplers
(:func:`categorical_sample`, :func:`multi_categorical_sample`), :func:`linear_logprob_entropy` and
:func:`linear_ppo_loss` (torch); :func:`cuda_available` and :func:`build_info` describe the compiled core. The torch-only
parts are imported on first use, so ``import fastppo`` never imports torch.
"""

from __future__ import annotations

import os

from . import _C
from .advantages import gae

__version__: str = _C.__version__

__all__ = [
    "PPOLossOutput",
    "__version__",
    "build_info",
    "categorical_logprob_entropy",
    "categorical_sample",
    "cuda_available",
    "gae",
    "linear_logprob_entropy",
    "linear_ppo_loss",
    "multi_categorical_logprob_entropy",
    "multi_categorical_sample",
    "normal_logprob_entropy",
    "ppo_loss",
    "tanh_normal_logprob_entropy",
]

_TORCH_ONLY = {
    "ppo_loss": "loss",
    "PPOLossOutput": "loss",
    "categorical_logprob_entropy": "heads",
    "categorical_sample": "heads",
    "normal_logprob_entropy": "heads",
    "multi_categorical_logprob_entropy": "heads",
    "multi_categorical_sample": "heads",
    "tanh_normal_logprob_entropy": "heads",
    "linear_logprob_entropy": "linear",
    "linear_ppo_loss": "linear_loss",
}


def __getattr__(name: str):
    module = _TORCH_ONLY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastppo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def cuda_available() -> bool:
    """True when this build has CUDA kernels and the CUDA driver reports at least one device.

    Answered by the compiled module (what it was built with, and what its runtime sees), never by
    looking for a CUDA compiler.
    """
    return bool(_C.WITH_CUDA) and _C.cuda_device_count() > 0


def build_info() -> str:
    """One line describing the compiled core: version, compiler, the CPU loops' thread runtime
    (OpenMP and its library, or fastppo's thread pool) and thread count (``FASTPPO_NUM_THREADS``
    sets it for fastppo alone), the instruction set of the CPU loops (``FASTPPO_CPU_ISA=baseline``
    or ``avx2`` picks a narrower one) and the copies compiled, CUDA, sanitizers, and anything the
    build had to leave out (``_C.build_info()`` has the same as a dict)."""
    info = _C.build_info()
    cuda = (
        f"CUDA runtime {info['cuda_runtime_version']} for {info['cuda_architectures']}, "
        f"{_C.cuda_device_count()} device(s) visible"
        if info["cuda"]
        else "no CUDA (CPU-only build)"
    )
    runtime = info["thread_runtime"]
    if runtime == "openmp":
        library = os.path.basename(info["thread_runtime_library"]) or "unknown library"
        threads = f"OpenMP {info['openmp_version']} ({library}) with {info['threads']} threads"
    elif runtime == "pool":
        threads = f"thread pool with {info['threads']} threads"
    else:
        threads = "no OpenMP (1 thread)"
    parts = [
        f"fastppo {info['version']}",
        f"compiler {info['compiler'].strip()}",
        threads,
        f"CPU loops {info['cpu_isa']} (compiled: {info['cpu_isa_compiled']})",
        cuda,
    ]
    if info["sanitizers"]:
        parts.append(f"sanitizers {info['sanitizers']}")
    parts += [f"build warning: {w}" for w in info["build_warnings"]]
    return "; ".join(parts)
