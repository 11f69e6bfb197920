"""One OpenMP runtime per process for an installed wheel.

``auditwheel repair`` grafts the wheel's own copy of libgomp into ``fastppo.libs`` under a renamed
soname (``libgomp-<hash>.so.1``). Beside torch, which ships ``torch/lib/libgomp.so.1``, a process that
imports fastppo first would then run two OpenMP runtimes whose idle threads spin on the same cores:
measured here, a torch MLP step right after a fastppo kernel 1.5-1.9x slower and fastppo's loss 2.8x
slower (``benchmarks/results/thread_runtime_cpu.md``, row ``b-libgomp-grafted-fastppo-first``). A
source build links ``libgomp.so.1`` by the same soname as torch's, so the two share one runtime in
either import order. For the wheel, :func:`share_torch_openmp` loads torch's libgomp globally before
the compiled core, so that the core's OpenMP calls (``GOMP_parallel``, ``omp_get_*``: symbol versions
every libgomp since GCC 4.9 has) bind to it, as when torch is imported first. torch itself is not
imported, and nothing is done when torch is not installed or the core is not a grafted wheel's.
"""

from __future__ import annotations

import sys
from pathlib import Path


def grafted_libgomp(package_dir: Path) -> list:
    """The libgomp copies auditwheel grafted beside this package (``<site-packages>/fastppo.libs``)."""
    return sorted((package_dir.parent / "fastppo.libs").glob("libgomp*.so*"))


def torch_libgomp() -> Path | None:
    """The libgomp the installed torch ships (``torch/lib`` or, in older wheels, ``torch.libs``),
    found without importing torch; None when torch is not installed or ships none."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    torch_dir = Path(list(spec.submodule_search_locations)[0])
    for folder in (torch_dir / "lib", torch_dir.parent / "torch.libs"):
        found = sorted(folder.glob("libgomp*.so*"))
        if found:
            return found[0]
    return None


def core_dir() -> Path | None:
    """The folder of the compiled core ``fastppo._C`` (found, not loaded; an editable install keeps it
    apart from the Python sources), or None."""
    import importlib.util

    spec = importlib.util.find_spec("fastppo._C")
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None


def share_torch_openmp(package_dir: Path | None = None) -> Path | None:
    """Loads torch's libgomp with RTLD_GLOBAL when this fastppo (the compiled core's folder,
    ``package_dir``, found when None) is a wheel with a grafted libgomp and torch is installed but
    not yet imported; returns the library loaded, or None."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):  # torch's runtime is already global
        return None
    package_dir = core_dir() if package_dir is None else package_dir
    if package_dir is None or not grafted_libgomp(package_dir):  # a source build shares it by soname
        return None
    library = torch_libgomp()
    if library is None:
        return None
    import ctypes
    import os

    try:
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:  # the wheel's own runtime then serves fastppo alone: correct, as before
        return None
    return library
