"""AWQ: scale up the weight columns that meet large activations before rounding them to int4.

Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv:2306.00978. For weight-only int4, each smoothing group (the Linears that read
one input, ``distill_lab.quantization.smoothquant.smoothing_groups``) gets ``s = mean|X|^a``, with
the exponent ``a`` picked on calibration rows by the error of the quantized layers' output; the
inverse scale is folded into the previous op, so the float model computes the same function.
Then each weight's group ranges are clipped where that lowers the rounding error (AWQ's clipping step).
The same clipping, weighted by the head's input ``E[x²]``, is applied to an int4 embedding table and the
output head that reads it (``embedding_bits=4``): measured on the combined recipe's distilled student
(40 pydoc test windows), the int4 embedding alone cost +11.8 % perplexity with plain min/max groups and
+6.6 % clipped this way (an unweighted clip made it worse: +21 %).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..summary import Summary
from .api import misfit
from .configs import Int4WeightOnlyConfig
from .embeddings import INT4_EMBEDDING_GROUP
from .modules import embedding_and_head, module_name
from .primitives import clip_weight_, fake_quantize
from .registry import format_for
from .smoothquant import ActivationStats, apply_group_scale, group_scale, smoothing_groups, stats_for

__all__ = ["awq_"]


def _quant_error(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor,
                 bits: int, group_size: int, symmetric: bool) -> float:
    """Output error Σ‖x Wᵀ - (x/s) Q(W·s)ᵀ‖² of a group of Linears sharing input ``x`` (S, K); ``refs`` = x Wᵀ."""
    err = 0.0
    xs = x / s  # (S, K)
    for w, ref in zip(weights, refs):
        q = fake_quantize(w * s, bits, group_size, symmetric, axis=-1)  # (N, K)
        err += (xs @ q.t() - ref).pow(2).sum().item()
    return err


@torch.no_grad()
def awq_(model: nn.Module, config: Int4WeightOnlyConfig | None = None, *, calibration=None,
         stats: ActivationStats | None = None, grid: int = 11, filter_fn=None, clip: bool = True,
         progress: bool = True) -> Summary:
    """AWQ-style scaling in place for ``config``'s int4 grid: per group, ``s = mean|x|^a`` with ``a`` searched.

    ``calibration``: token batches, each (B, T) ids, run once through the float model; or pass
    ``stats``, their ``ActivationStats`` (``collect_activation_stats``). ``filter_fn`` picks the
    smoothing groups as in ``smooth_``.
    For each group the exponent ``a`` in ``linspace(0, 1, grid)`` that minimizes the output
    error of the round-to-nearest quantized Linears is kept (``a = 0`` is plain RTN, so the
    search never does worse on the calibration rows). With ``clip``, each scaled weight is then
    clamped to the per-group range that minimizes its rounding error weighted by ``E[x²]`` (AWQ's
    clipping step; ``primitives.search_clip_ratios``). Returns a ``Summary``: {group: a}, and the groups
    the grid does not divide. Quantize afterwards
    with the same config: ``quantize_(model, config)``.
    """
    config = Int4WeightOnlyConfig() if config is None else config
    if not isinstance(config, Int4WeightOnlyConfig):
        raise ValueError(f"config={config!r}; allowed: an Int4WeightOnlyConfig (AWQ serves weight-only int4)")
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid={grid!r}; allowed: an int >= 2")
    stats = stats_for(model, calibration, stats, progress)
    bits, group_size, symmetric = config.bits, config.group_size, config.symmetric
    spec = format_for(config)
    chosen = Summary("awq_", {"type": type(config).__name__, "group_size": group_size, "grid": grid, "clip": clip},
                     unit="scale exponent a")
    groups = smoothing_groups(model, filter_fn)
    for group in tqdm(groups, desc="AWQ search", leave=False, disable=not progress):
        first = group.linears[0][0]
        width = group.linears[0][1].in_features
        if not spec.fits(width, config):  # the format's own rule, as quantize_ will apply it
            chosen.kept[group.name] = misfit(width, config)
            continue
        x = stats.samples[first].float()  # (S, K)
        weights = [lin.weight.detach().float().cpu() for _, lin in group.linears]
        refs = [x @ w.t() for w in weights]  # (S, N) float outputs
        mean = stats.absmean(first).float().clamp_min(1e-6)  # (K,)
        if group.kind == "v_to_o":
            mean, _ = group_scale(group, mean)
        best = (float("inf"), 0.0, None)
        for a in torch.linspace(0, 1, grid).tolist():
            s = mean.pow(a)
            s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
            err = _quant_error(x, weights, refs, s, bits, group_size, symmetric)
            if err < best[0]:
                best = (err, a, s)
        _, a, s = best
        s_in, s_prev = group_scale(group, s)
        apply_group_scale(group, s_in, s_prev)
        if clip:
            importance = (x / s_in).pow(2).mean(0)  # (K,) E[x²] of the scaled input
            for _, lin in group.linears:
                clip_weight_(lin.weight, bits, group_size, symmetric, importance.to(lin.weight.device))
        chosen.changed[group.name] = a
    if clip and config.embedding_bits == 4:
        _clip_head_(model, stats)
    return chosen


def _clip_head_(model: nn.Module, stats: ActivationStats) -> None:
    """AWQ's clipping step for the output head (and the embedding table, when tied) on the int4 embedding grid.

    The head's groups are clipped to the ranges that minimize its output error, weighted by ``E[x²]`` of
    the head's input (the final hidden states). A tied table is clipped once, for the head: its rows are
    also what the embedding looks up. An untied embedding is left as it is.
    """
    emb, head = embedding_and_head(model)
    name = module_name(model, head)
    if not isinstance(head, nn.Linear) or name not in stats.samples or head.in_features % INT4_EMBEDDING_GROUP:
        return
    tied = emb is not None and getattr(emb, "weight", None) is head.weight
    if not tied and type(emb) is nn.Embedding:
        return  # an untied head gets its own grid in quantize_embedding_and_head_, not the embedding's
    importance = stats.samples[name].float().pow(2).mean(0)  # (K,) E[x²] of the head's input
    clip_weight_(head.weight.data, 4, INT4_EMBEDDING_GROUP, False, importance.to(head.weight.device))
