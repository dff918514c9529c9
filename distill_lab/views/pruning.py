"""Lesson views of pruning (notebook 03): perplexity against sparsity, one real layer pruned live, summaries.

Each view returns plain data; ``distill_lab.plotting`` draws it and ``distill_lab.widgets`` wires it to knobs.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import parameter_count
from ..evaluate import perplexity
from ..pruning.masks import check_sparsity, magnitude_scores, unstructured_mask, wanda_scores
from ..pruning.selection import StopForward, as_batches
from ..pruning.unstructured import MagnitudeConfig, WandaConfig, input_norms, prune_
from ..runtime import device_of

__all__ = ["PRUNING_IMPORTANCE", "describe", "layer_pruning_view", "linear_inputs", "sparsity_curve", "sparsity_curve_view",
           "to_json"]

PRUNING_IMPORTANCE = ("magnitude", "wanda")  # the two unstructured importance scores the views compare


def _check_importance(importance: str) -> None:
    if importance not in PRUNING_IMPORTANCE:
        raise ValueError(f"importance={importance!r}; allowed: {', '.join(PRUNING_IMPORTANCE)}")


def sparsity_curve(model: nn.Module, windows: torch.Tensor, calibration=None, sparsities=(0.1, 0.3, 0.5, 0.7),
                   batch_size: int = 8, bf16: bool | str = "auto", progress: bool = True,
                   norms: dict[str, torch.Tensor] | None = None) -> dict:
    """Test perplexity of magnitude and Wanda pruning at fixed sparsities (precomputed for the slider).

    Wanda uses one set of input norms from the dense model (one-shot; pass ``norms`` from
    ``input_norms`` or ``calibration``), so each point costs one pruning and one evaluation.
    Returns ``{"sparsities", "magnitude", "wanda", "dense"}``.
    """
    if norms is None:
        norms = input_norms(model, calibration=calibration)
    dense = perplexity(model, windows, batch_size, bf16, progress=False)
    curves = {"sparsities": [0.0] + [float(s) for s in sparsities], "magnitude": [dense], "wanda": [dense],
              "dense": dense}
    jobs = [(s, name) for s in sparsities for name in PRUNING_IMPORTANCE]
    for s, name in tqdm(jobs, desc="sparsity curve", leave=False, disable=not progress):
        pruned = copy.deepcopy(model)
        config = WandaConfig(s) if name == "wanda" else MagnitudeConfig(s)
        prune_(pruned, config, norms=norms)
        curves[name].append(perplexity(pruned, windows, batch_size, bf16, progress=False))
        del pruned
    return curves


def sparsity_curve_view(curves: dict, sparsity: float, importance: str = "wanda") -> dict:
    """Pick a point of a precomputed curve: the perplexity of ``importance`` at ``sparsity`` (pure, instant)."""
    _check_importance(importance)
    sparsities = curves["sparsities"]
    if sparsity not in sparsities:
        raise ValueError(f"sparsity={sparsity!r}; allowed: one of the precomputed {sparsities}")
    i = sparsities.index(sparsity)
    other = "magnitude" if importance == "wanda" else "wanda"
    return {"curves": curves, "sparsity": sparsity, "importance": importance, "ppl": curves[importance][i],
            "other_ppl": curves[other][i], "dense_ppl": curves["dense"],
            "ratio_to_dense": curves[importance][i] / curves["dense"]}


@torch.inference_mode()
def linear_inputs(model: nn.Module, name: str, calibration, max_tokens: int = 512) -> torch.Tensor:
    """Inputs of one named Linear over the calibration batches, as (tokens, in_features) fp32 on the CPU.

    The forward stops at that Linear once ``max_tokens`` are collected (later layers are not run).
    """
    linear = dict(model.named_modules()).get(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"name={name!r} is not an nn.Linear of this model")
    rows = []

    def hook(module, args):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())  # (B*T, in)
        raise StopForward

    handle = linear.register_forward_pre_hook(hook)
    device = device_of(model)
    try:
        for batch in as_batches(calibration):
            try:
                model(batch.to(device))
            except StopForward:
                pass
            if sum(r.shape[0] for r in rows) >= max_tokens:
                break
    finally:
        handle.remove()
    return torch.cat(rows)[:max_tokens]  # (N, in)


@torch.no_grad()
def layer_pruning_view(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float, importance: str = "wanda",
                       name: str = "layer") -> dict:
    """Prune one real (out, in) weight at ``sparsity`` with both scores; return the output error on ``inputs`` (N, in).

    Recomputed on every call (about 20 ms for a 576 x 1536 layer): the relative error
    ``||X W^T - X (M * W)^T|| / ||X W^T||`` of magnitude and Wanda masks, and which |W| the chosen one keeps.
    """
    _check_importance(importance)
    check_sparsity(sparsity)
    w = weight.detach().float().cpu()  # (out, in)
    x = inputs.float().cpu()  # (N, in)
    dense = x @ w.t()  # (N, out)
    scores = {"magnitude": magnitude_scores(w), "wanda": wanda_scores(w, x.norm(dim=0))}
    errors, masks = {}, {}
    for kind, s in scores.items():
        masks[kind] = unstructured_mask(s, sparsity, "row")  # (out, in), True = kept
        errors[kind] = float((dense - x @ (w * masks[kind]).t()).norm() / dense.norm())
    mask = masks[importance]
    return {"name": name, "sparsity": sparsity, "importance": importance, "errors": errors,
            "kept_abs": w[mask].abs(), "pruned_abs": w[~mask].abs(),
            "largest_pruned": float(w[~mask].abs().max()) if (~mask).any() else 0.0}


def describe(model: nn.Module) -> str:
    """One line: layers, heads (query/KV), head_dim, intermediate size, parameters."""
    c = model.config
    n = parameter_count(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (f"{c.num_hidden_layers} layers, {c.num_attention_heads} query / {c.num_key_value_heads} KV heads "
            f"x {head_dim}, intermediate {c.intermediate_size}, {n / 1e6:.1f}M parameters")


def to_json(obj) -> str:
    """JSON for results that may hold tensors."""
    def default(o):
        if isinstance(o, torch.Tensor):
            return o.tolist()
        raise TypeError(type(o).__name__)
    return json.dumps(obj, default=default, indent=2)
