"""The package as built: version, build information, no torch in the compiled core."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

import fastppo
from fastppo import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Build tools run without the sanitizer runtimes .ci/sanitize preloads into Python and its children.
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def test_version_is_the_one_in_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert fastppo.__version__ == pyproject["project"]["version"]
    assert _C.build_info()["version"] == fastppo.__version__


def test_build_info_names_version_compiler_threads_and_cuda():
    info = fastppo.build_info()
    raw = _C.build_info()
    assert f"fastppo {fastppo.__version__}" in info
    assert raw["compiler"].strip() in info
    assert f"{raw['threads']} threads" in info or (raw["thread_runtime"] == "none" and "1 thread" in info)
    assert raw["threads"] >= 1
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
    ldd = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True, env=TOOL_ENV).stdout
    assert "libtorch" not in ldd and "libc10" not in ldd
    assert "libcudart.so" not in ldd  # the CUDA runtime is linked statically


# ---- The build tells the truth, and degrades instead of failing -------------------------------------

CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="needs cmake")


def test_build_info_fields_agree_with_each_other():
    raw = _C.build_info()
    compiled = raw["cpu_isa_compiled"].split(",")
    assert compiled[0] == "baseline" and set(compiled) <= {"baseline", "avx2", "avx512"}
    assert raw["cpu_isa"] in compiled
    assert all(isinstance(w, str) and w for w in raw["build_warnings"])
    assert raw["thread_runtime"] in ("openmp", "pool", "none")
    assert raw["openmp"] == (raw["thread_runtime"] == "openmp")
    if not raw["openmp"]:
        assert raw["openmp_version"] is None and raw["thread_runtime_library"] is None
    if raw["thread_runtime"] == "none":
        assert raw["threads"] == 1
    info = fastppo.build_info()
    assert f"compiled: {raw['cpu_isa_compiled']}" in info
    assert all(w in info for w in raw["build_warnings"])


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_instruction_set_copies_named_by_build_info_are_in_the_binary():
    """A copy build_info() names must hold that instruction set's registers (a compiler that ignored
    the target regions would leave every copy baseline while build_info() said avx512)."""
    raw = _C.build_info()
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                          check=True, env=TOOL_ENV).stdout
    compiled = raw["cpu_isa_compiled"].split(",")
    assert ("%zmm" in code) == ("avx512" in compiled) or raw["cuda"]  # CUDA's static runtime has its own code
    assert ("%ymm" in code) == ("avx2" in compiled) or raw["cuda"]
    assert ("avx512" in compiled) <= ("%zmm" in code) and ("avx2" in compiled) <= ("%ymm" in code)


@pytest.mark.parametrize("compiler", ["g++", "clang++"])
def test_instruction_set_guard_fails_to_compile_outside_its_region(compiler, tmp_path):
    """cpu_isa_regions.h's guards compile inside their regions and fail outside: the per-instruction-set
    copies are either real or refused at build time (CMake then builds the baseline copy alone)."""
    if shutil.which(compiler) is None:
        pytest.skip(f"needs {compiler}")
    inside = tmp_path / "inside.cpp"
    inside.write_text((ROOT / "cmake" / "isa_regions_probe.cpp").read_text())
    outside = tmp_path / "outside.cpp"
    outside.write_text('#include "cpu_isa_regions.h"\nnamespace a { FASTPPO_ISA_GUARD_AVX2 }\n'
                       'namespace b { FASTPPO_ISA_GUARD_AVX512 }\n')

    def compiles(path):
        cmd = [compiler, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", "-c", str(path), "-o", str(tmp_path / "x.o")]
        return subprocess.run(cmd, capture_output=True, env=TOOL_ENV).returncode == 0

    assert compiles(inside)
    assert not compiles(outside)


@needs_cmake
def test_default_cuda_architectures_follow_the_nvcc_version(tmp_path):
    script = tmp_path / "archs.cmake"
    script.write_text(
        f'include("{ROOT / "cmake" / "cuda_architectures.cmake"}")\n'
        "foreach(v 10.2 11.4 11.8 12.4 12.8 13.0)\n"
        "  fastppo_default_cuda_architectures(${v} out)\n"
        '  message("${v}=${out}")\n'
        "endforeach()\n"
    )
    out = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True, check=True, env=TOOL_ENV).stderr
    archs = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert archs["10.2"] == ""  # too old: CPU-only
    for version, lowest, newest in [("11.4", 70, 86), ("11.8", 70, 90), ("12.4", 70, 90), ("12.8", 70, 120),
                                    ("13.0", 75, 120)]:
        numbers = [int(a.split("-")[0]) for a in archs[version].split(";")]
        assert min(numbers) == lowest and max(numbers) == newest, (version, archs[version])
        assert not archs[version].split(";")[-1].endswith("-real")  # PTX for GPUs newer than the list
    assert "100-real" not in archs["12.4"]  # nvcc before 12.8 rejects Blackwell


def configure(tmp_path, *defines):
    """Configures the project (no build) into tmp_path; returns build_info's generated header text."""
    pybind11 = pytest.importorskip("pybind11")
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path), "-DSKBUILD_PROJECT_NAME=fastppo",
           "-DSKBUILD_PROJECT_VERSION=0.0.0", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *defines]
    result = subprocess.run(cmd, capture_output=True, text=True, env=TOOL_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return (tmp_path / "generated" / "fastppo_build_config.h").read_text(), result.stdout


@needs_cmake
def test_configure_without_openmp_builds_single_threaded_with_a_warning(tmp_path):
    header, _ = configure(tmp_path, "-DFASTPPO_ENABLE_CUDA=OFF", "-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=TRUE")
    assert "no OpenMP found" in header and "run on one thread" in header


def compile_flags(build_dir):
    """The compile commands CMake generated (Makefiles' flags.make or build.ninja), as one text."""
    files = [*build_dir.glob("CMakeFiles/_C.dir/flags.make"), *build_dir.glob("build.ninja")]
    return "\n".join(f.read_text() for f in files)


@needs_cmake
def test_configure_pool_threads_links_no_openmp_and_keeps_omp_simd(tmp_path):
    header, stdout = configure(tmp_path, "-DFASTPPO_ENABLE_CUDA=OFF", "-DFASTPPO_THREADS=pool")
    assert "fastppo: CPU loops on fastppo's thread pool" in stdout and "OpenMP" not in header
    flags = compile_flags(tmp_path)
    assert "FASTPPO_THREAD_POOL=1" in flags and "-fopenmp-simd" in flags
    assert re.search(r"-fopenmp(?!-simd)", flags) is None


@needs_cmake
def test_configure_rejects_an_unknown_thread_runtime(tmp_path):
    pybind11 = pytest.importorskip("pybind11")
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path), "-DSKBUILD_PROJECT_NAME=fastppo",
           "-DSKBUILD_PROJECT_VERSION=0.0.0", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DFASTPPO_ENABLE_CUDA=OFF", "-DFASTPPO_THREADS=tbb"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=TOOL_ENV)
    assert result.returncode != 0
    assert "FASTPPO_THREADS must be openmp or pool, got 'tbb'" in result.stdout + result.stderr


@needs_cmake
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_configure_leaves_out_cuda_architectures_nvcc_cannot_build(tmp_path):
    # sm_35 is outside every nvcc that builds fastppo (CUDA 12 dropped it): it is left out, the rest kept.
    header, stdout = configure(tmp_path, "-DFASTPPO_CUDA_ARCHITECTURES=90-real;35-real")
    assert "cannot build CUDA architectures 35-real: left out" in header
    assert "fastppo: CUDA kernels for 90-real " in stdout
    header, stdout = configure(tmp_path / "none", "-DCMAKE_CUDA_ARCHITECTURES=35-real")
    assert "failed to build a test kernel for any of 35-real: CPU-only build" in header
    assert "fastppo: CPU-only build" in stdout
