"""Version and provenance: ``fastppo --version`` and ``fastppo.build_info()`` name the wheel this
fastppo was installed from (or a source build), the compiler, the CUDA architectures and the thread
runtime; a CUDA op asked for where there is no CUDA driver is a clear Python error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import fastppo
from fastppo import _C
from fastppo.cli import main


def fake_install(tmp_path: Path, tags: list[str]) -> metadata.Distribution:
    """The files an installer leaves for a fastppo wheel with `tags`, under `tmp_path`."""
    (tmp_path / "fastppo").mkdir()
    (tmp_path / "fastppo" / "__init__.py").write_text("")
    info = tmp_path / f"fastppo-{fastppo.__version__}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fastppo\nVersion: {fastppo.__version__}\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                + "".join(f"Tag: {t}\n" for t in tags))
    return metadata.PathDistribution(info)


@pytest.mark.parametrize("tags,expected", [
    (["cp311-cp311-manylinux_2_34_x86_64"], "cp311-cp311-manylinux_2_34_x86_64"),
    (["cp39-cp39-manylinux_2_17_x86_64", "cp39-cp39-manylinux2014_x86_64"],
     "cp39-cp39-manylinux_2_17_x86_64.manylinux2014_x86_64"),
    (["cp312-cp312-linux_x86_64"], "cp312-cp312-linux_x86_64"),  # `pip install .` builds and installs a wheel too
])
def test_wheel_tag_is_read_from_the_installed_wheel(tmp_path, monkeypatch, tags, expected):
    dist = fake_install(tmp_path, tags)
    monkeypatch.setattr(metadata, "distribution", lambda name: dist)
    monkeypatch.setattr(fastppo, "__file__", str(tmp_path / "fastppo" / "__init__.py"))  # the wheel's files are the ones imported
    assert fastppo._wheel_tag() == expected
    assert f"; wheel {expected}; compiler " in fastppo.build_info()


def test_a_fastppo_that_is_not_the_installed_wheels_files_is_a_source_build(tmp_path, monkeypatch):
    dist = fake_install(tmp_path, ["cp311-cp311-manylinux_2_34_x86_64"])  # installed, but elsewhere
    monkeypatch.setattr(metadata, "distribution", lambda name: dist)
    assert fastppo._wheel_tag() is None
    assert "; source build; compiler " in fastppo.build_info()

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert fastppo._wheel_tag() is None
    assert "; source build; " in fastppo.build_info() and "wheel" not in fastppo.build_info()


def test_build_info_names_the_wheel_compiler_cuda_architectures_and_thread_runtime():
    raw = _C.build_info()
    parts = fastppo.build_info().split("; ")
    assert parts[0] == f"fastppo {fastppo.__version__}"
    tag = fastppo._wheel_tag()
    assert parts[1] == (f"wheel {tag}" if tag else "source build")
    assert parts[2] == f"compiler {raw['compiler'].strip()}" and re.match(r"compiler (gcc|clang) \d+\.\d+", parts[2])
    # The thread runtime as the compiled core reports it (OpenMP, fastppo's own pool, or none) and its threads.
    threads = parts[3]
    runtime = raw.get("thread_runtime", "openmp" if raw["openmp"] else "none")
    count = raw.get("threads", raw.get("openmp_max_threads"))
    if runtime == "openmp":
        assert threads.startswith(f"OpenMP {raw['openmp_version']} ") and threads.endswith(f" with {count} threads")
    elif runtime == "pool":
        assert threads == f"thread pool with {count} threads"
    else:
        assert threads == "no OpenMP (1 thread)"
    cuda = next(p for p in parts if "CUDA" in p)
    if raw["cuda"]:
        assert f"for {raw['cuda_architectures']}," in cuda and re.fullmatch(r"\d+(-real)?(,\d+(-real)?)*", raw["cuda_architectures"])
    else:
        assert cuda == "no CUDA (CPU-only build)"


@pytest.mark.skipif(not os.environ.get("FASTPPO_TESTS_INSTALLED_IN"), reason="runs against the installed wheel (.ci/wheel)")
def test_the_installed_wheel_is_a_repaired_manylinux_one():
    tag = fastppo._wheel_tag()
    assert tag is not None and re.fullmatch(r"cp3\d+-cp3\d+-manylinux_2_\d+_x86_64(\.manylinux\w+)*", tag), tag
    assert f"; wheel {tag}; " in fastppo.build_info()


def test_version_prints_build_info_one_part_a_line(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"fastppo {fastppo.__version__}"
        assert lines == fastppo.build_info().split("; ")


def test_version_command_does_not_import_torch():
    code = ("import sys\nfrom fastppo.cli import main\nassert main(['--version']) == 0\n"
            "assert 'torch' not in sys.modules, 'fastppo --version imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[0] == f"fastppo {fastppo.__version__}"
    # and through the installed command's entry point
    out = subprocess.run([sys.executable, "-m", "fastppo", "--version"], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[0] == f"fastppo {fastppo.__version__}"


def gae_on_cuda_device_0():
    """Asks the compiled core to run GAE on CUDA device 0 (host addresses: it must fail before any launch)."""
    x = np.zeros((1, 1), np.float32)
    flags = np.zeros((1, 1), np.uint8)
    last = np.zeros(1, np.float32)
    out = np.zeros((1, 1), np.float32)
    _C.gae(1, 1, "float32", (x, 1, 1), (x, 1, 1), (flags, 1, 1), "uint8", (flags, 1, 1), "uint8", (last, 1),
           out, out.copy(), 0.99, 0.95, 0, 0)


@pytest.mark.skipif(_C.cuda_device_count() > 0, reason="needs a machine where the CUDA runtime sees no device")
def test_a_cuda_op_without_a_driver_or_device_is_a_clear_error():
    assert fastppo.cuda_available() is False
    if _C.WITH_CUDA:
        # The module imported (the driver is opened at run time, never linked); the op says why it cannot run.
        with pytest.raises(RuntimeError, match=r"fastppo\.gae: cudaGetDevice: .*needs an NVIDIA driver .*"
                                               r"fastppo\.cuda_available\(\) is False"):
            gae_on_cuda_device_0()
    else:
        with pytest.raises(RuntimeError, match=r"fastppo\._C\.gae: this build of fastppo has no CUDA support"):
            gae_on_cuda_device_0()


# ------------------------------------------------------------------ one OpenMP runtime beside torch

def test_only_a_grafted_libgomp_with_torch_installed_loads_torchs(tmp_path, monkeypatch):
    from fastppo import _openmp

    package = tmp_path / "fastppo"
    package.mkdir()
    assert _openmp.grafted_libgomp(package) == [] and _openmp.share_torch_openmp(package) is None  # a source build
    (tmp_path / "fastppo.libs").mkdir()
    grafted = tmp_path / "fastppo.libs" / "libgomp-0123abcd.so.1"
    grafted.write_bytes(b"")
    assert _openmp.grafted_libgomp(package) == [grafted]
    monkeypatch.setattr(_openmp, "torch_libgomp", lambda: None)  # torch not installed: nothing to share
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert _openmp.share_torch_openmp(package) is None
    missing = tmp_path / "no_such_libgomp.so.1"
    monkeypatch.setattr(_openmp, "torch_libgomp", lambda: missing)  # a library that cannot load: left alone
    assert _openmp.share_torch_openmp(package) is None


def test_an_installed_wheel_runs_on_torchs_openmp_runtime_even_when_fastppo_is_imported_first():
    from fastppo import _openmp

    package = Path(_C.__file__).resolve().parent  # the compiled core's folder (an editable install splits them)
    if not _openmp.grafted_libgomp(package):
        pytest.skip("this fastppo is not a wheel with a grafted libgomp (a source build shares torch's by soname)")
    torch_gomp = _openmp.torch_libgomp()
    if torch_gomp is None:
        pytest.skip("torch is not installed")
    code = ("import sys, fastppo; assert 'torch' not in sys.modules; "
            "print(fastppo._C.build_info()['thread_runtime_library'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == torch_gomp.resolve(), out
