"""--track and TensorBoard: CleanRL's metric names, the run's settings, the videos of
--capture-video, a resumed run continuing its W&B run; W&B runs offline (WANDB_MODE=offline)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("envpool")

from fastppo import progress, track  # noqa: E402
from fastppo import train as T  # noqa: E402
from fastppo.track import CLEANRL_NAMES, tracked_scalars  # noqa: E402

CLEANRL = ("charts/episodic_return", "charts/SPS", "charts/learning_rate", "losses/value_loss", "losses/policy_loss",
           "losses/entropy", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance")


def tiny(tmp_path, **changes):
    changes = dict(dict(total_timesteps=512), **changes)
    return T.Args(update_epochs=1, run_dir=str(tmp_path), run_name="run", log_every=1000, **changes)


def test_tracked_names_are_cleanrls():
    record = dict(iteration=3, global_step=768, first_iteration=1, sps=100.0, time=2.0, episodic_return=None,
                  episodic_return_last10=12.0, episodes=7, learning_rate=1e-3, explained_variance=0.5, pg_loss=-0.1,
                  v_loss=3.0, entropy=0.6, approx_kl=0.01, old_approx_kl=0.02, clipfrac=0.1, time_env=1.5, custom=4)
    assert tracked_scalars(record) == {
        "charts/SPS": 100.0, "charts/seconds": 2.0, "charts/episodic_return_last10": 12.0, "charts/episodes": 7.0,
        "charts/learning_rate": 1e-3, "losses/explained_variance": 0.5, "losses/policy_loss": -0.1,
        "losses/value_loss": 3.0, "losses/entropy": 0.6, "losses/approx_kl": 0.01, "losses/old_approx_kl": 0.02,
        "losses/clipfrac": 0.1, "time/env": 1.5, "charts/custom": 4.0}
    assert set(CLEANRL) <= set(CLEANRL_NAMES.values())


class _Writer:
    """SummaryWriter's add_scalar and close, kept in memory."""

    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_same_names(tmp_path, monkeypatch):
    writer = _Writer()
    monkeypatch.setattr(progress, "tensorboard_writer", lambda run_dir: writer)
    T.train(tiny(tmp_path))
    tags = {tag for tag, _, _ in writer.scalars}
    assert set(CLEANRL) <= tags and not tags & {"v_loss", "sps", "episodic_return"}
    steps = sorted({step for _, _, step in writer.scalars})
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["global_step"] for r in records] and writer.closed
    sps = [v for tag, v, _ in writer.scalars if tag == "charts/SPS"]
    assert sps == [r["sps"] for r in records]


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = []
    close = track.RunLogger.close

    def keep(self):  # the W&B run's summary and config before it finishes
        seen.append(dict(summary=dict(self.wandb.summary), config=dict(self.wandb.config), id=self.wandb.id))
        close(self)

    monkeypatch.setattr(track.RunLogger, "close", keep)
    return seen


def test_track_offline_logs_metrics_config_and_videos(tmp_path, offline):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("pygame")
    T.train(tiny(tmp_path, track=True, wandb_project="fastppo-tests", capture_video=True, video_every=1,
                 video_max_steps=30))
    run = tmp_path / "run"
    (logged,) = offline
    assert set(CLEANRL) <= set(logged["summary"]) and logged["summary"]["global_step"] == 512
    assert logged["config"]["env_id"] == "CartPole-v1" and logged["config"]["track"] is True
    assert (run / "wandb_id").read_text() == logged["id"]
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and (offline_runs[0] / f"run-{logged['id']}.wandb").exists()
    assert sorted(p.name for p in (run / "videos").iterdir()) == ["iteration000001.mp4", "iteration000002.mp4"]
    assert len(list(offline_runs[0].rglob("media/videos/**/*.mp4"))) == 2


def test_a_resumed_run_goes_on_in_its_wandb_run(tmp_path, offline):
    T.train(tiny(tmp_path, track=True, total_timesteps=768, checkpoint_every=1), stop_after=1)
    T.train(T.Args(), resume=str(tmp_path / "run"))
    first, second = offline
    assert first["id"] == second["id"] and second["summary"]["global_step"] == 768


def test_missing_packages_are_named(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match=r"--track needs wandb: pip install 'fastppo\[track\]'"):
        track.RunLogger(tmp_path, tiny(tmp_path, track=True))
