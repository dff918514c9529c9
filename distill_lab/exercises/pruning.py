"""Exercise checks for notebook 03 (pruning): a magnitude mask, Wanda scores and a 2:4 mask."""

from __future__ import annotations

import torch

from ..pruning.masks import nm_mask, unstructured_mask
from ._check import check


def _magnitude_mask_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    return unstructured_mask(weight.abs(), sparsity, "row")


def _wanda_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.abs() * x.pow(2).sum(0).sqrt()[None, :]  # (out, in) * ||X_j||_2


def _nm_reference(scores: torch.Tensor) -> torch.Tensor:
    return nm_mask(scores, 2, 4)


def _cases_weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g), torch.randn(16, 32, generator=g), torch.randn(3, 12, generator=g)]


def check_magnitude_mask(fn) -> bool:
    """Check ``fn(weight, sparsity)``: a bool keep-mask that zeros the smallest |w| in each output row."""
    weights = _cases_weights(0)
    cases = [(weights[0], 0.5), (weights[1], 0.25), (weights[2], 0.5), (weights[1], 0.0)]
    return check("magnitude mask (per row)", lambda w, s: torch.as_tensor(fn(w, s)).bool(),
                 _magnitude_mask_reference, cases)


def check_wanda_scores(fn) -> bool:
    """Check ``fn(weight, x)``: Wanda scores |W_ij| * ||X_j||_2 for weight (out, in) and inputs x (tokens, in)."""
    g = torch.Generator().manual_seed(1)
    weights = _cases_weights(1)
    cases = [(w, torch.randn(10, w.shape[1], generator=g) * torch.rand(w.shape[1], generator=g) * 5)
             for w in weights]
    return check("Wanda scores", fn, _wanda_reference, cases)


def check_nm_mask(fn) -> bool:
    """Check ``fn(scores)``: a bool keep-mask keeping the 2 best of every 4 consecutive inputs of each row."""
    weights = _cases_weights(2)
    cases = [(w.abs(),) for w in weights]
    return check("2:4 mask", lambda s: torch.as_tensor(fn(s)).bool(), _nm_reference, cases)
