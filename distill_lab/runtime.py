"""Where a model runs: the one device and autocast helper of the package (timers are in ``timing``).

* ``device_of(module)``: the device of a module's first parameter (or buffer).
* ``autocast(device, bf16, phase)``: bf16 autocast when ``bf16`` resolves to True on this machine for
  the phase (``bf16="auto"`` asks ``hardware.resolve_bf16``, which measures it), otherwise disabled.
"""

from __future__ import annotations

import torch
from torch import nn

from .hardware import resolve_bf16

__all__ = ["autocast", "device_of"]


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter, or first buffer; CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def autocast(device: torch.device | str, bf16: bool | str = False, phase: str = "prefill"):
    """bf16 autocast on ``device`` if ``bf16`` resolves to True there for ``phase`` ('prefill' or 'decode';
    ``"auto"``: measured), else disabled."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=resolve_bf16(bf16, device, phase=phase))
