"""What a run shows while it trains: the live progress line or bar, and TensorBoard scalars."""

from __future__ import annotations

import sys
from pathlib import Path


class Progress:
    """The live status (steps, SPS, recent mean return, ETA, timing sections): a tqdm bar on a
    terminal, a printed line every ``every`` iterations otherwise (logs, CI)."""

    def __init__(self, total_iterations: int, first_iteration: int, every: int):
        self.total, self.every = total_iterations, every
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_iterations, initial=first_iteration - 1, unit="it", dynamic_ncols=True)

    @staticmethod
    def _fields(record: dict, timing: dict) -> str:
        ret = record["episodic_return"]
        return (f"step {record['global_step']} | {record['sps']:.0f} SPS | "
                f"return {'n/a' if ret is None else format(ret, '.1f')} | "
                + " ".join(f"{k} {v:.1f}s" for k, v in timing.items()))

    def update(self, iteration: int, record: dict, timing: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._fields(record, timing), refresh=True)
            return
        if iteration % self.every and iteration != self.total:
            return
        eta = record["time"] / max(iteration - record["first_iteration"] + 1, 1) * (self.total - iteration)
        print(f"[{iteration}/{self.total}] {self._fields(record, timing)} | eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))
