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
from typing import TYPE_CHECKING

from ._openmp import share_torch_openmp as _share_torch_openmp

# An installed wheel: torch's OpenMP runtime, when torch is installed, before the compiled core's
# (one runtime in the process; see fastppo._openmp).
_share_torch_openmp()

from . import _C  # noqa: E402
from .advantages import gae  # noqa: E402

if TYPE_CHECKING:  # the torch-only names, imported on first use by __getattr__ below
    from .heads import (categorical_logprob_entropy, categorical_sample, multi_categorical_logprob_entropy,
                        multi_categorical_sample, normal_logprob_entropy, tanh_normal_logprob_entropy)
    from .linear import linear_logprob_entropy
    from .linear_loss import linear_ppo_loss
    from .loss import PPOLossOutput, ppo_loss

__version__: str = _C.__version__
"""The package's version (``pyproject.toml``'s), as the compiled core reports it."""

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


def _wheel_tag() -> str | None:
    """The tag of the wheel this fastppo was installed from, as its ``.dist-info/WHEEL`` file gives it
    (e.g. ``"cp311-cp311-manylinux_2_34_x86_64"``; several tags of one wheel are joined by ``"."`` as
    in a wheel's file name), or None when this fastppo is not an installed wheel's files: a source
    tree on ``sys.path``, an editable install, or an installed fastppo that is not the one imported.
    """
    from importlib import metadata
    from pathlib import Path

    try:
        dist = metadata.distribution("fastppo")
        wheel = dist.read_text("WHEEL")
        here = Path(dist.locate_file("fastppo/__init__.py")).resolve()
    except (metadata.PackageNotFoundError, OSError):
        return None
    if wheel is None or here != Path(__file__).resolve():
        return None
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    if not tags:
        return None
    # Tags share the interpreter and ABI parts and differ in the platform (manylinux aliases).
    python, abi = tags[0].split("-")[:2]
    platforms = ".".join(dict.fromkeys(t.split("-", 2)[2] for t in tags))
    return f"{python}-{abi}-{platforms}"


def _build_info_parts() -> list[str]:
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
    tag = _wheel_tag()
    parts = [
        f"fastppo {info['version']}",
        f"wheel {tag}" if tag else "source build",
        f"compiler {info['compiler'].strip()}",
        threads,
        f"CPU loops {info['cpu_isa']} (compiled: {info['cpu_isa_compiled']})",
        cuda,
    ]
    if info["sanitizers"]:
        parts.append(f"sanitizers {info['sanitizers']}")
    parts += [f"build warning: {w}" for w in info["build_warnings"]]
    return parts


def build_info() -> str:
    """One line describing this fastppo: version, the tag of the wheel it was installed from (read
    from its ``.dist-info/WHEEL``, e.g. ``wheel cp311-cp311-manylinux_2_34_x86_64``) or ``source
    build``, compiler, the CPU loops' thread runtime (OpenMP and its library, or fastppo's thread
    pool) and thread count (``FASTPPO_NUM_THREADS`` sets it for fastppo alone), the instruction set of the CPU
    loops (``FASTPPO_CPU_ISA=baseline`` or ``avx2`` picks a narrower one) and the copies compiled,
    CUDA (runtime version and architectures), sanitizers, and anything the build had to leave out
    (``_C.build_info()`` has the compiled core's part as a dict). ``fastppo --version`` prints the
    same, one part a line."""
    return "; ".join(_build_info_parts())
