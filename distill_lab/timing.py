"""How long something takes: the one timer of the package.

* ``sync(device)``: wait for queued CUDA work, so that a timer measures the work and not its launch.
* ``timed(fn)``: seconds of one call of ``fn()``, synchronised.
* ``median_seconds(fn)``: the median of ``repeats`` timed calls after ``warmup`` untimed ones.
* ``interleaved_times(probes)``: several probes timed round-robin (A, B, C, A, B, C, ...), every round kept.
* ``interleaved_medians(probes)``: the same, one median each.
* ``SpeedRatio.of_rounds(base, other)``: how many times faster ``other`` ran, round by round: the median and
  its spread (interquartile range), and a verdict against a threshold that says "within noise" when the
  spread crosses it.
* ``stopwatch()``: wall seconds since it started (how long a step, a search or a load took).

Speed is reported as ratios against a baseline timed in the same process (see ``distill_lab.speed``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["MIN_ROUNDS", "SpeedRatio", "interleaved_medians", "interleaved_times", "median_seconds", "medians", "stopwatch",
           "sync", "timed"]

MIN_ROUNDS = 5  # a speed ratio a lesson prints is the median of at least this many alternating rounds


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


def interleaved_times(probes: dict[str, Callable[[], float]], repeats: int = 3, warmup: int = 1,
                      progress: bool = False) -> dict[str, list[float]]:
    """The seconds each probe returns, calling the probes round-robin: ``{name: [seconds per round]}``.

    A probe times its own work (usually with ``timed``), so it can leave its setup untimed.
    Interleaving makes ratios fair on a busy machine: a slow moment hits every probe of that round alike,
    so ``SpeedRatio.of_rounds`` compares two probes round by round. The first ``warmup`` rounds are discarded.
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
    return times


def interleaved_medians(probes: dict[str, Callable[[], float]], repeats: int = 3, warmup: int = 1,
                        progress: bool = False) -> dict[str, float]:
    """Median of the seconds each probe returns, probes called round-robin (``interleaved_times``)."""
    return medians(interleaved_times(probes, repeats=repeats, warmup=warmup, progress=progress))


def medians(times: dict) -> dict:
    """``{name: median}`` of ``{name: [seconds per round]}`` (what ``interleaved_times`` returns)."""
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass(frozen=True)
class SpeedRatio:
    """How many times faster one thing ran than a baseline timed in the same rounds (above 1: faster).

    ``median`` is the median of the per-round ratios ``base[i] / other[i]``; ``low`` and ``high`` are their
    quartiles (the interquartile range; with one round all three are equal). ``f"{r}"`` prints
    ``1.62× (1.55–1.70)``. ``r.holds(threshold)`` is True when the whole spread is at or above the threshold,
    False when it is all below, and None ("within noise") when the spread crosses it.
    """

    median: float
    low: float
    high: float
    rounds: int

    def __post_init__(self):
        if not (0 < self.low <= self.median <= self.high) or self.rounds < 1:
            raise ValueError(f"SpeedRatio(median={self.median}, low={self.low}, high={self.high}, "
                             f"rounds={self.rounds}); allowed: 0 < low <= median <= high, rounds >= 1")

    @classmethod
    def of_rounds(cls, base_s: Sequence[float], other_s: Sequence[float]) -> "SpeedRatio":
        """The ratio of two probes timed in the same rounds: ``base_s[i] / other_s[i]`` for every round ``i``."""
        if len(base_s) != len(other_s) or not base_s:
            raise ValueError(f"{len(base_s)} baseline rounds and {len(other_s)} other rounds; "
                             "allowed: the same number, at least 1")
        ratios = sorted(b / o for b, o in zip(base_s, other_s))
        if len(ratios) == 1:
            return cls(ratios[0], ratios[0], ratios[0], 1)
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(statistics.median(ratios), q1, q3, len(ratios))

    def holds(self, threshold: float) -> bool | None:
        """True: faster than ``threshold`` beyond the noise; False: slower beyond it; None: within noise."""
        if self.low >= threshold:
            return True
        if self.high < threshold:
            return False
        return None

    def mark(self, threshold: float) -> str:
        """``✓``, ``✗`` or ``within noise`` against ``threshold`` (see ``holds``)."""
        return {True: "✓", False: "✗", None: "within noise"}[self.holds(threshold)]

    @property
    def basis(self) -> str:
        """What the number is, in words: ``'median of 5 alternating rounds, IQR in brackets'``."""
        if self.rounds == 1:
            return "one round, so no spread: not enough to decide a verdict on"
        return f"median of {self.rounds} alternating rounds, interquartile range in brackets"

    def __float__(self) -> float:
        return self.median

    def __format__(self, spec: str) -> str:
        """``.2f``-style specs format the three numbers; width and alignment (``>20``) pad the whole text."""
        if spec and spec[-1] in "efg":
            return f"{self.median:{spec}}× ({self.low:{spec}}–{self.high:{spec}})"
        return format(f"{self.median:.2f}× ({self.low:.2f}–{self.high:.2f})", spec)

    def __str__(self) -> str:
        return format(self)


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
