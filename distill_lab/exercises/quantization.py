"""Exercise checks for notebook 02 (quantization): absmax codes, a group-wise min/max grid, SQNR."""

from __future__ import annotations

import torch

from ..quantization.primitives import fake_quantize, quantize_tensor, sqnr_db
from ._check import check


def _codes_and_scales(result) -> torch.Tensor:
    codes, scales = result
    return torch.cat([torch.as_tensor(codes).double().flatten(), torch.as_tensor(scales).double().flatten()])


def _absmax_reference(w: torch.Tensor, bits: int):
    q = quantize_tensor(w, bits, None, True, -1)
    return q.codes, q.scales.reshape(-1)


def check_absmax_quantize(fn) -> bool:
    """Check ``fn(w, bits) -> (codes, scales)``: per-row symmetric (absmax) quantization of a 2-D ``w``.

    ``scales`` has one entry per row, ``absmax / (2**(bits-1) - 1)``; ``codes = round(w / scale)``.
    """
    g = torch.Generator().manual_seed(2)
    cases = [(torch.randn(4, 8, generator=g), 8), (torch.randn(16, 64, generator=g) * 0.02, 4),
             (torch.randn(3, 5, generator=g) * 100, 2)]
    return check("absmax quantization", lambda w, b: _codes_and_scales(fn(w, b)),
                 lambda w, b: _codes_and_scales(_absmax_reference(w, b)), cases, atol=1e-6, rtol=1e-5)


def check_minmax_group_fake_quant(fn) -> bool:
    """Check ``fn(w, bits, group_size) -> w_hat``: asymmetric min/max grid per group of ``group_size`` inputs."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(4, 16, generator=g), 4, 8), (torch.randn(8, 64, generator=g) * 0.05 + 0.02, 3, 32),
             (torch.randn(2, 12, generator=g), 8, 12)]
    return check("min/max group quantization", fn, lambda w, b, gs: fake_quantize(w, b, gs, False), cases,
                 atol=1e-5, rtol=1e-4)


def check_sqnr(fn) -> bool:
    """Check ``fn(w, w_hat) -> float``: signal-to-quantization-noise ratio in dB."""
    g = torch.Generator().manual_seed(4)
    cases = []
    for scale in (0.1, 0.01, 1e-4):
        w = torch.randn(32, 32, generator=g)
        cases.append((w, w + scale * torch.randn(32, 32, generator=g)))
    return check("SQNR", fn, lambda w, w_hat: sqnr_db(w, w_hat), cases, atol=1e-3, rtol=1e-4)
