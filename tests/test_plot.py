"""fastppo plot: run folders read back (resumes, cut lines, tracked names), seeds grouped by task and
preset into mean and min-max bands, reference lines, the command line, and 3 seeds x 3 tasks drawn
in seconds."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fastppo import cli  # noqa: E402
from fastppo.plot import Curve, Reference, draw_curves, find_runs, parse_reference, plot_runs, read_run  # noqa: E402
from fastppo.plot import _band  # noqa: E402


def write_run(folder, env_id, preset, seed, records, config=True, tail=""):
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps(dict(env_id=env_id, preset=preset, seed=seed)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def synthetic(n=200, seed=0, batch=2048, ret0=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        out.append(dict(iteration=i, global_step=i * batch, time=0.5 * i, first_iteration=1,
                        episodic_return=None if i < 3 else ret0 + 10.0 * i + float(rng.normal()),
                        v_loss=1.0 / i, sps=batch / 0.5))
    return out


def test_read_run_keeps_the_logged_points_and_joins_the_clock_across_a_resume(tmp_path):
    records = [dict(iteration=1, global_step=100, time=1.0, first_iteration=1, episodic_return=None),
               dict(iteration=2, global_step=200, time=2.0, first_iteration=1, episodic_return=5.0),
               # resumed from iteration 2: the new process's clock starts again
               dict(iteration=3, global_step=300, time=0.5, first_iteration=3, episodic_return=7.0),
               dict(iteration=4, global_step=400, time=1.5, first_iteration=3, episodic_return=9.0)]
    run = write_run(tmp_path / "r", "CartPole-v1", "classic", 4, records, tail='{"iteration": 5, "glo')
    curve = read_run(run)
    assert (curve.env_id, curve.group, curve.seed) == ("CartPole-v1", "classic", 4)
    np.testing.assert_array_equal(curve.steps, [200, 300, 400])
    np.testing.assert_array_equal(curve.seconds, [2.0, 2.5, 3.5])
    np.testing.assert_array_equal(curve.values, [5.0, 7.0, 9.0])
    # a tracked (CleanRL) name reads the same key
    np.testing.assert_array_equal(read_run(run, "charts/episodic_return").values, curve.values)
    with pytest.raises(ValueError, match="'nope' is not logged.*episodic_return"):
        read_run(run, "nope")


def test_band_is_the_mean_min_and_max_over_seeds_on_their_shared_range():
    a = Curve("T", "p", 1, np.array([0.0, 10.0, 20.0]), np.zeros(3), np.array([0.0, 10.0, 20.0]))
    b = Curve("T", "p", 2, np.array([5.0, 15.0]), np.zeros(2), np.array([1.0, 1.0]))
    x, mean, low, high = _band([a, b], "steps")
    assert x[0] == 5.0 and x[-1] == 15.0  # the range both cover
    for i, xi in enumerate(x):  # reference: plain interpolation of each, then the statistics
        ya = xi  # a is y = x
        yb = 1.0
        assert mean[i] == pytest.approx((ya + yb) / 2) and low[i] == pytest.approx(min(ya, yb))
        assert high[i] == pytest.approx(max(ya, yb))
    x1, m1, _, _ = _band([a], "steps")  # one seed: its own points
    np.testing.assert_array_equal(x1, a.steps)
    np.testing.assert_array_equal(m1, a.values)


def test_runs_are_grouped_by_task_and_preset(tmp_path):
    for env in ("A-v0", "B-v0"):
        for preset in ("classic", "classic-fast"):
            for seed in (1, 2):
                write_run(tmp_path / "runs" / f"{env}_{preset}_{seed}", env, preset, seed, synthetic(20, seed))
    runs = find_runs([tmp_path / "runs"])
    assert len(runs) == 8
    fig = draw_curves([read_run(r) for r in runs], references=[Reference("ref", 100.0), Reference("only B", 50.0, "B-v0")])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["A-v0", "B-v0"]
    labels = [[line.get_label() for line in ax.lines] for ax in panels]
    assert labels[0] == ["classic, mean of 2 seeds", "classic-fast, mean of 2 seeds", "ref (100)"]
    assert labels[1] == ["classic, mean of 2 seeds", "classic-fast, mean of 2 seeds", "ref (100)", "only B (50)"]
    fig2 = draw_curves([read_run(r) for r in runs], axes=("steps", "seconds"))
    assert [ax.get_xlabel() for ax in fig2.axes] == ["environment steps"] * 2 + ["wall time (s)"] * 2


def test_references_parse_and_bad_ones_are_named():
    assert parse_reference("CleanRL=1442.6") == Reference("CleanRL", 1442.6, None)
    assert parse_reference("HalfCheetah-v5:CleanRL=1442.6") == Reference("CleanRL", 1442.6, "HalfCheetah-v5")
    for bad in ("CleanRL", "CleanRL=abc", "=3"):
        with pytest.raises(ValueError, match="--ref must be LABEL=VALUE"):
            parse_reference(bad)
    with pytest.raises(ValueError, match="not a run folder"):
        find_runs(["/nonexistent/run"])


def test_cli_plots_three_seeds_of_three_tasks_in_seconds(tmp_path, capsys):
    for env in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"):
        for seed in (1, 2, 3):
            write_run(tmp_path / "runs" / f"{env}__seed{seed}", env, "mujoco", seed, synthetic(488, seed))
    out = tmp_path / "curves.png"
    start = time.perf_counter()
    code = cli.main(["plot", str(tmp_path / "runs"), "--out", str(out), "--ref", "CleanRL=1442.6"])
    seconds = time.perf_counter() - start
    assert code == 0 and out.exists()
    import matplotlib.image

    image = matplotlib.image.imread(str(out))
    assert image.shape[1] == 3 * 460 and image.shape[0] == 360  # three panels of 4.6 x 3.6 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # something was drawn
    assert seconds < 10, seconds  # target: < 3 s (measured by hand on an idle machine)
    assert cli.main(["plot", str(tmp_path / "runs"), "--metric", "losses/value_loss", "--x", "seconds",
                     "--out", str(tmp_path / "v.png")]) == 0
    assert cli.main(["plot", str(tmp_path / "runs"), "--metric", "nope", "--out", str(tmp_path / "n.png")]) == 2
    assert "'nope' is not logged" in capsys.readouterr().err


def test_plot_runs_of_a_real_run(tmp_path):
    pytest.importorskip("envpool")
    from fastppo import train as T

    T.train(T.Args(total_timesteps=512, update_epochs=1, run_dir=str(tmp_path), run_name="run", log_every=1000))
    out = plot_runs([tmp_path / "run"], tmp_path / "p.png", x="seconds")
    assert out.exists() and out.stat().st_size > 5000


def test_plotting_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fastppo.plot; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
