"""Views of notebook 00 (baseline): the next-token distribution at a sampling temperature."""

from __future__ import annotations

import torch

__all__ = ["entropy_bits", "temperature_probs", "temperature_view", "top_tokens"]


def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` (T < 1 sharpens, T > 1 flattens), same shape as ``logits``."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}; allowed: > 0")
    return torch.softmax(logits.float() / temperature, dim=-1)


def top_tokens(probs: torch.Tensor, tokenizer, k: int = 10) -> tuple[list[str], list[float]]:
    """Return the ``k`` most likely tokens (decoded) and their probabilities from a (V,) distribution."""
    values, indices = probs.topk(k)
    return [tokenizer.decode([i]) for i in indices.tolist()], values.tolist()


def entropy_bits(probs: torch.Tensor) -> float:
    """Shannon entropy of a (V,) distribution, in bits."""
    p = probs.double().clamp_min(1e-30)
    return float(-(p * p.log2()).sum())


def temperature_view(logits: torch.Tensor, tokenizer, temperature: float, k: int = 10) -> dict:
    """Top-``k`` tokens, their probabilities and the entropy of ``softmax(logits / T)``."""
    probs = temperature_probs(logits, temperature)
    tokens, top = top_tokens(probs, tokenizer, k)
    return {"temperature": temperature, "tokens": tokens, "probs": top,
            "entropy_bits": entropy_bits(probs)}
