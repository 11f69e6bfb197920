"""The masked-PPO benchmark: sb3-contrib's masked tasks as ``benchmarks/masked_envs.py`` registers them,
and ``python -m benchmarks.masked --tiny`` end to end (fastppo train and MaskablePPO, each run in its
own process, report, JSON and plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import masked  # noqa: E402
from benchmarks import masked_envs  # noqa: E402,F401 (registers the tasks)


@pytest.mark.parametrize("task, width, nvec", [("InvalidActionDiscrete-v0", 70, [70]),
                                               ("InvalidActionMultiDiscrete-v0", 5, [2, 3])])
def test_registered_tasks_give_one_hot_states_masks_and_100_step_episodes(task, width, nvec):
    env = gym.make(masked.task_id(task))
    assert env.observation_space == gym.spaces.Box(0.0, 1.0, (width,), np.float32)
    obs, _ = env.reset(seed=3)
    total, steps, done = 0.0, 0, False
    while not done:
        assert obs.dtype == np.float32 and obs.shape == (width,)
        parts = np.split(obs, np.cumsum(nvec)[:-1])
        assert all(part.sum() == 1.0 for part in parts), obs  # one one-hot per component
        state = [int(np.argmax(part)) for part in parts]
        mask = np.asarray(env.get_wrapper_attr("action_masks")())
        assert mask.dtype == np.bool_ and mask.shape == (width,)
        assert all(mask[offset + s] for offset, s in zip(np.cumsum([0] + nvec[:-1]), state))  # the state is legal
        assert (~mask).sum() == (55 if width == 70 else 1)
        action = state[0] if len(nvec) == 1 else np.array(state)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, steps, done = total + reward, steps + 1, terminated or truncated
    assert not terminated and steps == 100 and total == 100.0  # the identity policy earns 1 per step
    env.close()


def test_a_seeded_reset_repeats_the_states():
    env = gym.make(masked.task_id("InvalidActionDiscrete-v0"))
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=11)
        states = [int(np.argmax(obs))]
        for _ in range(5):
            obs, *_ = env.step(0)
            states.append(int(np.argmax(obs)))
        runs.append(states)
    assert runs[0] == runs[1]
    env.close()


def test_fastppo_reads_the_tasks_masks_from_the_method():
    from fastppo.envs import probe_actions

    space, source = probe_actions(masked.task_id("InvalidActionMultiDiscrete-v0"))
    assert list(space.nvec) == [2, 3] and source == "method"


def test_total_timesteps_rounds_up_to_whole_rollouts():
    assert masked.settings_of("default")["total_timesteps"] % (8 * 256) == 0
    assert masked.settings_of("default", 5000)["total_timesteps"] == 3 * 2048
    assert masked.settings_of("tiny", 1)["total_timesteps"] == 8 * 64


def test_tiny_run_writes_report_json_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.masked", "--tiny", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads((tmp_path / "masked_cpu.json").read_text())
    assert document["mode"] == "tiny" and document["threads"] == {"fastppo": "1", "sb3-contrib": "1"}
    runs = {(r["task"], r["contender"]): r for r in document["results"]}
    assert set(runs) == {(t, c) for t in masked.TASKS for c in ("env-only", "fastppo", "sb3-contrib")}
    for (task, contender), r in runs.items():
        assert "failed" not in r, r
        assert r["sps"] > 0 and r["seconds"] > 0
        if contender != "env-only":
            assert r["steps"] == masked.TINY["total_timesteps"] and r["torch_threads"] == 1, r
            assert 0.0 <= r["eval_return"] <= 100.0 and 0.0 <= r["final_return"] <= 100.0, r
            assert r["curve"] and r["curve"][-1][0] == r["steps"], r["curve"]
    assert runs["InvalidActionDiscrete-v0", "fastppo"]["backend"] == "fused"  # masks run in the fused step
    assert set(document["ratios"]) == set(masked.TASKS)
    report = (tmp_path / "masked_cpu.md").read_text()
    assert "Tiny run" in report and "## Machine" in report and "Torch threads: fastppo 1, MaskablePPO 1" in report
    for task in masked.TASKS:
        assert f"- {task}: fastppo / MaskablePPO steps/s" in report
    assert (tmp_path / "masked_cpu.png").stat().st_size > 0
