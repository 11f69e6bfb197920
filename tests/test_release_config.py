"""The release pipeline's configuration, checked here since the pipeline itself runs elsewhere: which
wheels cibuildwheel builds ([tool.cibuildwheel] in pyproject.toml), what it does around each build,
and the workflow that runs it and publishes the result (.github/workflows/wheels.yml)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("cibuildwheel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CIBW = PYPROJECT["tool"]["cibuildwheel"]
WORKFLOW_FILE = ROOT / ".github" / "workflows" / "wheels.yml"

# One wheel per CPython the package supports, manylinux x86_64 only (no musllinux, no i686).
PYTHONS = ("3.11", "3.12", "3.13")
WANTED = {f"cp{v.replace('.', '')}-manylinux_x86_64" for v in PYTHONS}


def _cibuildwheel(*args: str) -> str:
    # CIBW_* variables in the caller's environment would change the selection: the file alone decides.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    result = subprocess.run([sys.executable, "-m", "cibuildwheel", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def identifiers() -> list:
    return _cibuildwheel("--print-build-identifiers", "--platform", "linux").split()


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW_FILE.read_text())


def test_cibuildwheel_builds_one_manylinux_x86_64_wheel_per_supported_python(identifiers):
    assert len(identifiers) == len(set(identifiers))
    assert set(identifiers) == WANTED


def test_supported_pythons_agree_with_the_package_metadata():
    project = PYPROJECT["project"]
    assert project["requires-python"] == f">={PYTHONS[0]}"
    listed = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert listed == set(PYTHONS)


def test_wheels_are_built_on_manylinux_2_28_and_repaired_without_the_cuda_driver():
    assert CIBW["manylinux-x86_64-image"] == "manylinux_2_28"
    repair = CIBW["linux"]["repair-wheel-command"]
    assert repair.startswith("auditwheel repair ") and "--exclude libcuda.so.1" in repair
    assert "{wheel}" in repair and "{dest_dir}" in repair


def test_cuda_comes_from_the_install_script_with_named_architectures():
    linux = CIBW["linux"]
    script = ROOT / "tools" / "install_cuda_manylinux.sh"
    assert linux["before-all"] == f"bash {script.relative_to(ROOT)}" and script.is_file()
    version = re.search(r"FASTPPO_CUDA_VERSION:-([0-9.]+)", script.read_text())[1]
    # CMake finds the nvcc the script installed, not another one.
    assert linux["environment"]["CUDACXX"] == f"/usr/local/cuda-{version}/bin/nvcc"
    archs = linux["environment"]["CUDAARCHS"].split(";")
    assert all(re.fullmatch(r"\d+(-real)?", a) for a in archs), archs
    # Turing and newer (tests/test_build.py asks this of a CUDA build), SASS for each, PTX in the last.
    assert all(int(a.split("-")[0]) >= 75 for a in archs)
    assert all(a.endswith("-real") for a in archs[:-1]) and not archs[-1].endswith("-real")


def test_each_wheel_is_tested_installed_with_torch_pinned_and_its_cuda_kernels_checked():
    assert "torch==2.13.0" in CIBW["before-test"].split()
    assert set(CIBW["test-extras"]) == {"test", "train"}
    command = " && ".join(CIBW["test-command"])
    assert "python -m pytest {project}/tests" in command
    assert "info['cuda']" in command and "build_warnings" in command


def test_cibuildwheel_reads_the_same_settings_for_every_wheel(identifiers, monkeypatch):
    from cibuildwheel.options import CommandLineArguments, compute_options

    monkeypatch.chdir(ROOT)  # cibuildwheel reads the pyproject.toml of its working directory
    args = CommandLineArguments.defaults()
    args.platform = "linux"
    options = compute_options("linux", args, {})
    for identifier in identifiers:
        build = options.build_options(identifier)
        environment = build.environment.as_dictionary(prev_environment={})
        assert environment["CUDAARCHS"] == CIBW["linux"]["environment"]["CUDAARCHS"], identifier
        assert build.before_all == CIBW["linux"]["before-all"], identifier
        assert build.repair_command == CIBW["linux"]["repair-wheel-command"], identifier
        assert build.test_command == " && ".join(CIBW["test-command"]), identifier


def test_workflow_builds_the_configured_wheels_and_an_sdist(workflow, identifiers):
    assert workflow["name"] == "wheels"
    jobs = workflow["jobs"]
    wheel_steps = jobs["wheel"]["steps"]
    action = next(s for s in wheel_steps if s.get("uses", "").startswith("pypa/cibuildwheel@"))
    # The action runs the cibuildwheel the tests check the configuration with.
    pinned = next(r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("cibuildwheel"))
    assert action["uses"] == "pypa/cibuildwheel@v" + pinned.split("==")[1]
    assert action["with"]["only"] == "${{ matrix.only }}"
    assert sorted(jobs["wheel"]["strategy"]["matrix"]["only"]) == sorted(identifiers)
    uploads = [s for s in wheel_steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and uploads[0]["with"]["path"] == action["with"]["output-dir"] + "/*.whl"
    assert any(s.get("run") == "pipx run build --sdist" for s in jobs["sdist"]["steps"])


def test_workflow_publishes_on_a_version_tag_by_trusted_publishing(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers["push"]["tags"] == ["v*"]
    publish = workflow["jobs"]["publish"]
    assert set(publish["needs"]) == {"wheel", "sdist"}
    assert "refs/tags/v" in publish["if"] and "push" in publish["if"]
    assert publish["permissions"] == {"id-token": "write"}
    assert any(s.get("uses", "").startswith("pypa/gh-action-pypi-publish@") for s in publish["steps"])
    # A pull request that changes what the wheels are made of runs the pipeline: its paths exist.
    paths = triggers["pull_request"]["paths"]
    assert "pyproject.toml" in paths and "tools/install_cuda_manylinux.sh" in paths
    for path in paths:
        assert any(ROOT.glob(path.replace("**", "*"))), f"{path} in the workflow's paths matches nothing"
