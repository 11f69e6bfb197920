"""Where ``fastppo train`` sends each iteration's metrics besides ``metrics.jsonl``: TensorBoard
(when installed) and, with ``--track``, Weights & Biases, both under CleanRL's names
(``charts/episodic_return``, ``charts/SPS``, ``losses/value_loss``, ...) against ``global_step``;
and, with ``--capture-video``, a video of the deterministic policy every ``--video-every``
iterations into the run folder's ``videos/`` (and to W&B).

W&B runs offline with ``WANDB_MODE=offline`` (``wandb sync`` uploads later). A resumed run goes on
in the same W&B run: its id is kept in the run folder's ``wandb_id``.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Optional

__all__ = ["CLEANRL_NAMES", "RunLogger", "tracked_scalars"]

# metrics.jsonl key -> the name CleanRL's scripts log it under (TensorBoard and W&B alike)
CLEANRL_NAMES = {
    "episodic_return": "charts/episodic_return",
    "episodic_return_last10": "charts/episodic_return_last10",
    "episodes": "charts/episodes",
    "sps": "charts/SPS",
    "learning_rate": "charts/learning_rate",
    "time": "charts/seconds",
    "pg_loss": "losses/policy_loss",
    "v_loss": "losses/value_loss",
    "entropy": "losses/entropy",
    "approx_kl": "losses/approx_kl",
    "old_approx_kl": "losses/old_approx_kl",
    "clipfrac": "losses/clipfrac",
    "explained_variance": "losses/explained_variance",
}
# Counters, not curves (global_step is the x axis).
NOT_TRACKED = ("iteration", "global_step", "first_iteration")


def tracked_name(key: str) -> str:
    """The tracked name of a metrics.jsonl key: CleanRL's, ``time/<section>`` for ``time_<section>``
    (the loop's timed sections), else ``charts/<key>``."""
    if key in CLEANRL_NAMES:
        return CLEANRL_NAMES[key]
    if key.startswith("time_"):
        return "time/" + key[len("time_"):]
    return "charts/" + key


def tracked_scalars(record: dict) -> dict:
    """The numbers of a metrics.jsonl record under their tracked names (None, the return before the
    first episode ends, is left out)."""
    return {tracked_name(k): float(v) for k, v in record.items()
            if k not in NOT_TRACKED and isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunLogger:
    """TensorBoard, W&B (``args.track``) and videos (``args.capture_video``) of a ``fastppo train``
    run in ``run_dir``; ``args`` are the run's settings (``fastppo.config.Args``, logged as the W&B
    run's config)."""

    def __init__(self, run_dir, args):
        from fastppo import progress

        self.run_dir, self.args = Path(run_dir), args
        self.writer = progress.tensorboard_writer(self.run_dir)
        self.wandb = None
        if getattr(args, "capture_video", False):
            from fastppo.export import check_feed_forward

            check_feed_forward(args, "--capture-video")
            try:
                import imageio_ffmpeg  # noqa: F401
            except ImportError as err:
                raise ValueError("--capture-video needs imageio and imageio-ffmpeg: pip install 'fastppo[video]'") from err
        if getattr(args, "track", False):
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--track needs wandb: pip install 'fastppo[track]'") from err
            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=self.run_dir.name,
                                    id=run_id, resume="allow", dir=str(self.run_dir), config=dataclasses.asdict(args))
            self.wandb.define_metric("global_step")
            self.wandb.define_metric("*", step_metric="global_step")

    def log(self, record: dict, global_step: int) -> None:
        """One iteration's record (``metrics.jsonl``'s) under the tracked names, at ``global_step``."""
        scalars = tracked_scalars(record)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, global_step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars, global_step=global_step))

    def capture(self, iteration: int, last: bool, global_step: int, agent, boundary, action_space,
                family: str) -> Optional[dict]:
        """With ``--capture-video``, every ``--video-every`` iterations and at the last: one episode of
        the policy as it is now (its normalization statistics frozen at their current values) into
        ``videos/iteration<k>.mp4``, logged to W&B as ``videos/episode``. Returns the video's summary."""
        args = self.args
        if not getattr(args, "capture_video", False) or not (last or iteration % args.video_every == 0):
            return None
        from fastppo.export import policy_for
        from fastppo.video import record_video

        stats = (boundary.obs_mean.copy(), boundary.obs_variance().copy()) if boundary.normalize_obs else None
        path = self.run_dir / "videos" / f"iteration{iteration:06d}.mp4"
        masked = (getattr(args, "action_masks", None) or "auto") != "off"  # where the environment gives them
        policy = policy_for(agent, action_space, stats, masked).to(next(agent.parameters()).device)
        video = record_video(policy, args.env_id, family, path,
                             seed=args.seed, max_steps=args.video_max_steps)
        if self.writer is not None:
            self.writer.add_scalar("charts/video_episodic_return", video["episode_return"], global_step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"videos/episode": wandb.Video(str(path), format="mp4"),
                            "charts/video_episodic_return": video["episode_return"], "global_step": global_step})
        return video

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
