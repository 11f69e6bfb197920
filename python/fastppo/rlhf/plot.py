"""``rlhf.png``: the proxy (reward-model) score, the hidden gold score and the KL of each RL run of
``fastppo rlhf`` per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def plot(run_dir: Path, runs: dict, sft_gold: float) -> Optional[Path]:
    """Writes ``run_dir/rlhf.png`` from ``runs`` (``{label: metrics records}``), the SFT policy's gold
    score as a line; returns its path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, history in runs.items():
        it = [r["iteration"] for r in history]
        axes[0].plot(it, [r["objective/scores"] for r in history], label=name)
        axes[1].plot(it, [r["objective/gold"] for r in history], label=name)
        axes[2].plot(it, [r["objective/kl"] for r in history], label=name)
    axes[1].axhline(sft_gold, color="gray", linestyle=":", label="SFT policy")
    for ax, title in zip(axes, ("proxy: reward-model score", "hidden gold score", "KL(policy || reference) per response")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    path = run_dir / "rlhf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
