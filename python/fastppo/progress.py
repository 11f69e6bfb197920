"""What a run shows while it trains (``fastppo train`` and ``fastppo rlhf``): the live progress bar
or line, and TensorBoard scalars."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Progress:
    """The live status of a run: a tqdm bar on a terminal, a printed line with the ETA every
    ``every`` iterations otherwise (logs, CI); nothing when ``every`` is 0 (the ranks other than 0
    of a data-parallel run). ``done``: iterations finished before this one began (a resumed run)."""

    def __init__(self, total: int, done: int, every: int, name: str = ""):
        self.total, self.done, self.every, self.start = total, done, every, time.perf_counter()
        self.label, self.bar = f"{name} " if name else "", None
        if every > 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=done, desc=name or None, unit="it", dynamic_ncols=True)

    def update(self, iteration: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=True)
        elif self.every > 0 and (iteration % self.every == 0 or iteration == self.total):
            eta = (time.perf_counter() - self.start) / max(iteration - self.done, 1) * (self.total - iteration)
            print(f"[{self.label}{iteration}/{self.total}] {text} | eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))
