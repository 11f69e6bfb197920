"""The package as built: version, build information, no torch in the compiled core."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import fastppo
from fastppo import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_the_one_in_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert fastppo.__version__ == pyproject["project"]["version"]
    assert _C.build_info()["version"] == fastppo.__version__


def test_build_info_names_version_compiler_threads_and_cuda():
    info = fastppo.build_info()
    raw = _C.build_info()
    assert f"fastppo {fastppo.__version__}" in info
    assert raw["compiler"] in info
    assert f"{raw['openmp_max_threads']} threads" in info
    assert raw["openmp_max_threads"] >= 1
    if raw["cuda"]:
        archs = raw["cuda_architectures"].split(",")
        assert archs and all(int(a.split("-")[0]) >= 75 for a in archs)
        assert raw["cuda_architectures"] in info
    else:
        assert "no CUDA" in info


def test_cuda_available_is_answered_by_the_compiled_module():
    assert isinstance(fastppo.cuda_available(), bool)
    assert isinstance(_C.cuda_device_count(), int)
    if not _C.WITH_CUDA:
        assert fastppo.cuda_available() is False
        assert _C.cuda_device_count() == 0


def test_numpy_use_does_not_import_torch():
    code = (
        "import sys, numpy as np, fastppo\n"
        "adv, ret = fastppo.gae(np.ones((4, 2)), np.zeros((4, 2)), np.zeros((4, 2), bool), np.zeros(2))\n"
        "assert type(adv) is np.ndarray and adv.shape == (4, 2)\n"
        "assert 'torch' not in sys.modules, 'importing fastppo pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiled_module_does_not_link_libtorch():
    ldd = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in ldd and "libc10" not in ldd
    assert "libcudart.so" not in ldd  # the CUDA runtime is linked statically
