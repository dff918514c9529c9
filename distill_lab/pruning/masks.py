"""Keep-masks and importance scores of single weight matrices: pure tensor functions, no model.

* Magnitude pruning: Han et al., 2015 (arXiv:1506.02626), score ``|W|``.
* Wanda: Sun et al., 2023 (arXiv:2306.11695), score ``|W_ij| * ||X_j||_2``, compared within each output row.
* N:M semi-structured sparsity: Mishra et al., 2021 (arXiv:2104.08378): keep N of every M inputs.

A keep-mask has the weight's shape (out, in); True = the weight is kept.
"""

from __future__ import annotations

import torch

__all__ = ["GRANULARITIES", "check_sparsity", "is_nm_sparse", "magnitude_scores", "nm_mask", "parse_pattern",
           "unstructured_mask", "wanda_scores"]

GRANULARITIES = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return ``(n, m)`` for an ``"N:M"`` pattern, None for ``"unstructured"``."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern={pattern!r}; allowed: 'unstructured' or 'N:M' such as '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r}; allowed: 'N:M' with 0 < N < M (keep N of every M)")
    return n, m


def check_sparsity(sparsity) -> None:
    """Raise ValueError unless ``sparsity`` is a number in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r}; allowed: a number in [0, 1)")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude importance ``|W|``, shape (out, in)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` for weight (out, in) and input-feature norms (in,)."""
    if input_norm.shape != weight.shape[1:]:
        raise ValueError(f"input_norm has shape {tuple(input_norm.shape)}; expected ({weight.shape[1]},)")
    return weight.detach().abs().float() * input_norm.to(weight.device).float()[None, :]  # (out, in)


def unstructured_mask(scores: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Keep-mask (True = kept) that zeros the lowest-scoring ``sparsity`` fraction, per row or per layer.

    Per row: every output row loses exactly ``floor(sparsity * in_features)`` weights.
    Per layer: the matrix loses exactly ``floor(sparsity * numel)`` weights (rows may differ).
    The k lowest come from ``torch.topk``, so the count is exact even when scores tie.
    """
    check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    mask = torch.ones_like(scores, dtype=torch.bool)
    if granularity == "row":
        k = int(scores.shape[-1] * sparsity)
        if k:
            idx = torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices  # (out, k)
            mask.scatter_(-1, idx, False)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices  # (k,)
            mask.view(-1)[idx] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask for N:M sparsity: in every group of ``m`` consecutive inputs keep the ``n`` best scores."""
    if not 0 < n < m:
        raise ValueError(f"n={n}, m={m}; allowed: 0 < n < m")
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not a multiple of m={m}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    idx = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Return True when every group of ``m`` consecutive inputs holds at most ``n`` non-zeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    nonzero = (weight.reshape(out_f, in_f // m, m) != 0).sum(-1)  # (out, in/m)
    return bool((nonzero <= n).all())
