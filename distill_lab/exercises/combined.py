"""Exercise checks for notebook 04 (combined compression): the size Amdahl law and the Pareto front."""

from __future__ import annotations

import torch

from ._check import check


def _overall_reduction_reference(embedding_share: float, embedding_factor: float, block_factor: float) -> float:
    # the fp32 file is 1 = embedding_share + (1 - embedding_share); each part shrinks by its own factor
    return 1.0 / (embedding_share / embedding_factor + (1.0 - embedding_share) / block_factor)


def _pareto_reference(sizes: torch.Tensor, ppls: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(len(sizes))
    for i in range(len(sizes)):
        no_worse = (sizes <= sizes[i]) & (ppls <= ppls[i])
        better = (sizes < sizes[i]) | (ppls < ppls[i])
        if bool((no_worse & better).any()):
            keep[i] = 0.0
    return keep


def check_overall_reduction(fn) -> bool:
    """Check ``fn(embedding_share, embedding_factor, block_factor)``: whole-model size reduction."""
    cases = [(0.21, 1.0, 8.0), (0.21, 4.0, 8.0), (0.21, 4.0, 1e6), (0.0, 4.0, 7.0), (0.5, 2.0, 2.0),
             (0.3, 3.9, 17.0)]
    return check("overall size reduction", fn, _overall_reduction_reference, cases, atol=1e-6, rtol=1e-6)


def check_pareto_front(fn) -> bool:
    """Check ``fn(sizes, ppls)``: a 0/1 tensor marking the points no other point beats on both size and ppl."""
    g = torch.Generator().manual_seed(4)
    cases = [(torch.tensor([513.0, 130.0, 70.0, 260.0, 40.0]), torch.tensor([1.0, 1.02, 1.1, 1.6, 2.5])),
             (torch.tensor([10.0, 20.0, 30.0]), torch.tensor([3.0, 2.0, 1.0])),
             (torch.tensor([10.0, 20.0, 30.0]), torch.tensor([1.0, 2.0, 3.0])),
             (torch.tensor([5.0, 5.0, 6.0]), torch.tensor([2.0, 2.0, 1.0])),  # ties: neither beats the other
             (torch.rand(12, generator=g) * 500, 1 + torch.rand(12, generator=g))]
    return check("Pareto front", lambda s, p: torch.as_tensor(fn(s, p)).float(), _pareto_reference, cases)
