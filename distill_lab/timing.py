"""How long something takes: the one timer of the package.

* ``sync(device)``: wait for queued CUDA work, so that a timer measures the work and not its launch.
* ``timed(fn)``: seconds of one call of ``fn()``, synchronised.
* ``median_seconds(fn)``: the median of ``repeats`` timed calls after ``warmup`` untimed ones.

Speed is reported as ratios against a baseline timed in the same process (see ``distill_lab.speed``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds", "sync", "timed"]


def sync(device: torch.device | str | None = None) -> None:
    """Block until queued CUDA work on ``device`` is done (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn()`` takes, synchronising ``device`` before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                   device: torch.device | str | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}; allowed: repeats >= 1, warmup >= 0")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))
