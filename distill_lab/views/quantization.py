"""The quantization knobs panel's numbers: one weight on its grid, the rounding errors, the SQNR."""

from __future__ import annotations

import torch

from ..quantization.primitives import Granularity, dequantize, quantize_tensor, sqnr_db

__all__ = ["GRANULARITY_OPTIONS", "quantization_view", "scale_layout"]

# the panel's choices: one scale per tensor, per output channel, or per group of this many inputs
GRANULARITY_OPTIONS = (Granularity.PER_TENSOR, Granularity.PER_CHANNEL, 32, 64, 128)


def scale_layout(granularity) -> tuple[int | None, int | None]:
    """``(group_size, axis)`` of ``quantize_tensor`` for a panel choice: a ``Granularity`` (or its name) or a group size."""
    if isinstance(granularity, str):
        try:
            member = Granularity(granularity)  # also "per-tensor" / "per-channel", the spelling of earlier versions
        except ValueError:
            return int(granularity), -1  # a group size written as a string, e.g. "64"
        if member in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
            return None, member.axis
        raise ValueError(f"granularity={granularity!r}; allowed: 'per_tensor', 'per_channel' or a group size (int)")
    return int(granularity), -1


def quantization_view(w: torch.Tensor, bits: int = 4, granularity=Granularity.PER_CHANNEL, symmetric: bool = True,
                      max_errors: int = 200_000) -> dict:
    """Quantize a 2-D weight and return what the knobs panel draws: one group with its grid, errors, SQNR.

    ``granularity`` is ``Granularity.PER_TENSOR``, ``Granularity.PER_CHANNEL`` (or their strings,
    'per_channel' or 'per-channel') or a group size along the input dimension.
    The group shown is the one holding the largest |w| (the hardest one for its grid).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out, in), got shape {tuple(w.shape)}")
    group_size, axis = scale_layout(granularity)
    q = quantize_tensor(w, bits, group_size, symmetric, axis)
    w_hat = dequantize(q)
    err = (w_hat - w).float().flatten()
    row, col = divmod(int(w.abs().argmax()), w.shape[1])
    if axis is None:
        values, g, r = w.flatten(), 0, 0
    else:
        size = group_size or w.shape[1]
        g, r = col // size, row
        values = w[row, g * size:(g + 1) * size]
    scale = float(q.scales.reshape(-1)[0] if axis is None else q.scales[r, g])
    zero = 0.0 if q.zero_points is None else float(
        q.zero_points.reshape(-1)[0] if axis is None else q.zero_points[r, g])
    levels = torch.arange(q.qmin, q.qmax + 1, dtype=torch.float32) * scale + zero
    step = torch.linspace(0, err.numel() - 1, min(err.numel(), max_errors)).long()
    return {"bits": bits, "granularity": granularity, "symmetric": symmetric,
            "sqnr_db": sqnr_db(w, w_hat), "mse": float(err.pow(2).mean()), "group_values": values.detach().float(),
            "grid": levels, "errors": err[step], "scale": scale,
            "bytes_per_weight": q.nbytes() / w.numel()}
