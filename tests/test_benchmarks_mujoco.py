"""The MuJoCo 1M-step benchmark's bookkeeping: its configurations resolve to the settings they name,
one short run is stored with its settings and load average, the report tabulates every configuration
next to the published numbers, and CleanRL's script is timed from its printed steps/s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("envpool")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import mujoco_1m as M  # noqa: E402
from fastppo.config import Args, resolve  # noqa: E402


@pytest.mark.parametrize("config,base", [("mujoco-fast", "mujoco"), ("mujoco-zoo-2env", "mujoco-zoo")])
def test_two_env_configs_keep_the_batch_per_update(config, base):
    for env_id in M.CLEANRL_1M:
        preset, changes = M.CONFIGS[config]
        assert M.CONFIGS[base][0] == base  # the one-environment configuration it halves
        two = resolve(Args(env_id=env_id, preset=preset, **changes(env_id)))
        one = resolve(Args(env_id=env_id, preset=base))
        assert (two.num_envs, two.num_steps) == (2, one.num_steps // 2)
        assert two.num_envs * two.num_steps == one.num_envs * one.num_steps
        assert (two.num_minibatches, two.update_epochs, two.learning_rate) == (one.num_minibatches, one.update_epochs,
                                                                              one.learning_rate)


def test_a_short_run_is_stored_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "RUNS", tmp_path)
    out = tmp_path / "mujoco-zoo" / "Hopper-v5__seed1.json"
    result = M.run_one("mujoco-zoo", "Hopper-v5", 1, 1024, out)
    stored = json.loads(out.read_text())
    assert stored["steps"] == result["steps"] == 1024 and stored["config"] == "mujoco-zoo"
    assert stored["settings"]["hidden_sizes"] == [256, 256] and stored["settings"]["num_steps"] == 512
    assert len(stored["load_before"]) == 3 and stored["backend"] == "fused" and "build" in stored
    (tmp_path / "cleanrl_timing.json").write_text(json.dumps({"Hopper-v5": dict(
        env_id="Hopper-v4", steps=2048, seconds=3.0, sps_printed=900, sps_wall=682.0, seconds_1m_estimate=1111.1,
        load=[0.1, 0.2, 0.3], date="d")}))
    t = M.time_fastppo("mujoco-zoo-2env", "Hopper-v5", 1024)
    assert t["steps"] == 1024 and t["sps"] > 0
    (tmp_path / "fastppo_timing.json").write_text(json.dumps({"mujoco-zoo-2env Hopper-v5": dict(t, sps=2700.0)}))
    text = M.report(M.load_runs())
    timing_row = next(line for line in text.splitlines() if line.startswith("| Hopper-v5 | not run"))
    assert "2700, 370 s, 3.0x" in timing_row and timing_row.endswith("| 900, 1111 s |")
    row = next(line for line in text.splitlines() if line.startswith("| Hopper-v5 | mujoco-zoo | 1 |"))
    assert "2410 +- 10" in row and "2382.9" in row
    assert "| Hopper-v4 | 2048 | 3 | 900 | 1111 | 0.1 |" in text


def test_cleanrl_timing_reads_the_scripts_printed_rate(tmp_path):
    fake = tmp_path / "ppo_continuous_action.py"  # stands in for CleanRL's script: prints as it does
    fake.write_text("import sys\nassert sys.argv[1:3] == ['--env-id', 'Walker2d-v4'] and '--no-cuda' in sys.argv\n"
                    "print('SPS: 1000')\nprint('SPS: 1250')\n")
    t = M.time_cleanrl(fake, sys.executable, "Walker2d-v5", 4096)
    assert (t["env_id"], t["steps"], t["sps_printed"], t["seconds_1m_estimate"]) == ("Walker2d-v4", 4096, 1250, 800.0)
    fake.write_text("raise SystemExit('no mujoco here')\n")
    with pytest.raises(RuntimeError, match="Walker2d-v4"):
        M.time_cleanrl(fake, sys.executable, "Walker2d-v5", 4096)
