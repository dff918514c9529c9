"""Where a model runs and how long it takes: the one device, autocast and timer helper of the package.

* ``device_of(module)``: the device of a module's first parameter (or buffer).
* ``autocast(device, bf16)``: bf16 autocast when ``bf16`` resolves to True on this machine
  (``bf16="auto"`` asks ``hardware.resolve_bf16``, which measures it), otherwise autocast disabled.
* ``sync(device)``: wait for queued CUDA work, so that a timer measures the work and not its launch.
* ``median_seconds(fn)``: the median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .hardware import resolve_bf16

__all__ = ["autocast", "device_of", "median_seconds", "sync", "timed"]


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter, or first buffer; CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def autocast(device: torch.device | str, bf16: bool | str = False):
    """bf16 autocast on ``device`` if ``bf16`` resolves to True there (``"auto"``: measured), else disabled."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_bf16(bf16, device))


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
