"""Wall-clock timing helper for the benchmark scripts in this folder.

``median_ms(fn, repeats, warmup)`` calls ``fn()`` ``warmup`` times untimed, then times calls one
at a time with ``time.perf_counter`` and returns the median in milliseconds. With a number for
``repeats`` it makes exactly that many timed calls. With ``repeats=None`` it keeps calling until
the timed calls add up to ``budget_s`` seconds, with at least ``min_repeats`` and at most
``max_repeats`` calls: a fast call is timed thousands of times, a call that takes seconds just
``min_repeats`` times. Pass ``sync`` (for example ``torch.cuda.synchronize``) to wait for
asynchronous work before starting and after stopping each call's clock.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional


def median_ms(
    fn: Callable[[], object],
    repeats: Optional[int] = None,
    warmup: int = 1,
    *,
    budget_s: float = 0.5,
    min_repeats: int = 3,
    max_repeats: int = 10_000,
    sync: Optional[Callable[[], None]] = None,
) -> float:
    """Median wall time of one call of ``fn()``, in milliseconds.

    Args:
        fn: the call to time; its result is discarded.
        repeats: number of timed calls, or None to fill ``budget_s`` seconds of timed calls
            (never fewer than ``min_repeats`` nor more than ``max_repeats``).
        warmup: untimed calls made first.
        sync: called before each clock start and, inside the timed region, after ``fn``.
    """
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    if repeats is not None:
        min_repeats = max_repeats = repeats
    times = []
    total = 0.0
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one call would only add noise
    try:
        while len(times) < max_repeats and (len(times) < min_repeats or total < budget_s):
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            total += elapsed
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times) * 1e3
