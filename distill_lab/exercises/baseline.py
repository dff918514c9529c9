"""Exercise checks for notebook 00 (baseline): perplexity from token losses, temperature softmax."""

from __future__ import annotations

import torch

from ._check import check


def _perplexity_reference(nll: torch.Tensor) -> torch.Tensor:
    return nll.double().mean().exp()


def _temperature_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def check_perplexity(fn) -> bool:
    """Check ``fn(nll)``: perplexity from a 1-D tensor of per-token negative log-likelihoods."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(n, generator=g) * 6,) for n in (1, 7, 300)] + [(torch.full((5,), 2.0),)]
    return check("perplexity", fn, _perplexity_reference, cases, atol=1e-6, rtol=1e-5)


def check_temperature_softmax(fn) -> bool:
    """Check ``fn(logits, temperature)``: softmax of logits / T along the last dimension."""
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(10, generator=g) * 5, t) for t in (0.5, 1.0, 2.0)]
    cases.append((torch.randn(3, 50, generator=g) * 20, 4.0))  # batched, large logits
    return check("temperature softmax", fn, _temperature_reference, cases, atol=1e-6, rtol=1e-5)
