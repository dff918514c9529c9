"""One calibration pass: run token batches through a model while forward hooks record what they need.

SmoothQuant/AWQ activation statistics (``smoothquant``), GPTQ Hessians (``gptq``), Wanda input
norms and structured-pruning importance (``prune``) all work the same way: register hooks on some
modules, run the calibration batches forward once, remove the hooks. The hooks differ; the pass
is this function, so every caller gets the same progress bar and removes its hooks even when a
forward fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .runtime import device_of as _device_of


def calibration_pass(model: nn.Module, batches: Iterable[torch.Tensor], handles: list, *,
                     desc: str = "calibration", progress: bool = False,
                     before_batch: Callable[[torch.Tensor], None] | None = None, **forward_kwargs) -> int:
    """Run each (B, T) batch through ``model`` on its device, remove the hook ``handles``; return the tokens seen."""
    device = _device_of(model)
    tokens = 0
    try:
        for batch in tqdm(list(batches), desc=desc, leave=False, disable=not progress):
            if before_batch is not None:
                before_batch(batch)
            model(batch.to(device), **forward_kwargs)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return tokens
