"""How long something takes: the one timer of the package.

* ``sync(device)``: wait for queued CUDA work, so that a timer measures the work and not its launch.
* ``timed(fn)``: seconds of one call of ``fn()``, synchronised.
* ``median_seconds(fn)``: the median of ``repeats`` timed calls after ``warmup`` untimed ones.
* ``interleaved_medians(probes)``: several probes timed round-robin (A, B, C, A, B, C, ...), one median each.
* ``stopwatch()``: wall seconds since it started (how long a step, a search or a load took).

Speed is reported as ratios against a baseline timed in the same process (see ``distill_lab.speed``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

__all__ = ["interleaved_medians", "median_seconds", "stopwatch", "sync", "timed"]


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


def interleaved_medians(probes: dict[str, Callable[[], float]], repeats: int = 3, warmup: int = 1,
                        progress: bool = False) -> dict[str, float]:
    """Median of the seconds each probe returns, calling the probes round-robin: ``{name: median seconds}``.

    A probe times its own work (usually with ``timed``), so it can leave its setup untimed.
    Interleaving makes ratios fair on a busy machine: a slow moment hits every probe alike.
    The first ``warmup`` rounds are discarded.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}; allowed: repeats >= 1, warmup >= 0")
    times: dict[str, list[float]] = {name: [] for name in probes}
    bar = tqdm(total=(warmup + repeats) * len(probes), desc="timing", leave=False, disable=not progress)
    for r in range(warmup + repeats):
        for name, probe in probes.items():
            seconds = probe()
            if r >= warmup:
                times[name].append(seconds)
            bar.update(1)
    bar.close()
    return {name: statistics.median(t) for name, t in times.items()}


def stopwatch() -> Callable[[], float]:
    """Start a wall clock: ``elapsed = stopwatch()``, then ``elapsed()`` is the seconds since (not synchronised).

    ``elapsed.start`` is the ``time.perf_counter()`` reading it started at, for deadlines
    (``elapsed.start + budget_s``, as ``hardware.min_ms`` takes them).
    """
    start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - start

    elapsed.start = start
    return elapsed
