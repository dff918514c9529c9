"""Unstructured and N:M (2:4) pruning of a model: magnitude and Wanda write zeros into Linear weights.

* Magnitude pruning: Han et al., 2015, "Learning both Weights and Connections for Efficient
  Neural Networks" (arXiv:1506.02626).
* Wanda: Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"
  (arXiv:2306.11695), run block by block as in the paper's code (``WandaConfig(sequential=True)``).

``prune_`` is the one in-place entry point of the package's pruning: it also takes a
``StructuredConfig`` (the model is then replaced in place by its smaller rebuild).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import check_linear_layout, decoder_blocks
from ..calibration import calibration_pass
from ..runtime import device_of
from ..summary import Summary
from .masks import GRANULARITIES, check_sparsity, magnitude_scores, nm_mask, parse_pattern, unstructured_mask, \
    wanda_scores
from .selection import StopForward, as_batches, prunable_linears, resolve_filter
from .structured import StructuredConfig, prune_structured_

__all__ = ["MagnitudeConfig", "WandaConfig", "input_norms", "keep_mask", "prune_"]


@dataclass
class MagnitudeConfig:
    """Unstructured (or N:M) magnitude pruning: drop the weights with the smallest ``|W|``.

    Which layers are pruned is ``prune_``'s ``filter_fn`` (default: all Linear layers but the head
    and the embeddings; ``exclude_globs(patterns)`` leaves fnmatch patterns of module names dense).
    """

    sparsity: float = 0.5  # fraction of weights set to zero in each pruned Linear, in [0, 1)
    granularity: str = "row"  # "row": exact sparsity per output row; "layer": per weight matrix
    pattern: str = "unstructured"  # "unstructured" or "N:M" (keep N of every M inputs, e.g. "2:4")

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        nm = parse_pattern(self.pattern)
        if nm is not None and not math.isclose(self.sparsity, 1 - nm[0] / nm[1]):
            raise ValueError(f"sparsity={self.sparsity} does not match pattern={self.pattern!r}, "
                             f"which implies sparsity={1 - nm[0] / nm[1]:g}")

    @property
    def nm(self) -> tuple[int, int] | None:
        """The ``(N, M)`` pair of an N:M pattern, or None when unstructured."""
        return parse_pattern(self.pattern)


@dataclass
class WandaConfig(MagnitudeConfig):
    """Wanda: drop the weights with the smallest ``|W_ij| * ||X_j||_2`` (needs calibration batches)."""

    sequential: bool = True  # prune block by block, feeding each block the pruned blocks' outputs (as the paper's code)


class _NormCollector:
    """Forward hooks that accumulate ``sum_t x_tj^2`` for the inputs of some Linear layers."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sq = {}
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            sq = x.pow(2).sum(0)  # (in,)
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: sq.sqrt() for name, sq in self.sq.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def input_norms(model: nn.Module, *, calibration, filter_fn=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """One dense forward over the calibration batches; return ``{linear name: ||X_j||_2 (in,)}``.

    For the Linear layers ``filter_fn`` selects (default: all but the head and the embeddings).
    """
    batches = as_batches(calibration)
    collector = _NormCollector(prunable_linears(model, resolve_filter(filter_fn)))
    calibration_pass(model, batches, collector.handles, progress=progress, use_cache=False)
    return collector.norms()


def keep_mask(weight: torch.Tensor, scores: torch.Tensor, config: MagnitudeConfig) -> torch.Tensor:
    """The keep-mask ``config`` asks for on these scores: N:M when it has a pattern, else per row or layer."""
    nm = config.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, config.sparsity, config.granularity)


@torch.no_grad()
def _apply(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.mul_(mask.to(linear.weight.dtype))


@torch.inference_mode()
def _capture_block_inputs(model: nn.Module, blocks, batches) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Return the first block's input ``hidden (B, T, H)`` per batch and every block's own kwargs per batch.

    Each block gets its own attention mask and position embeddings (sliding vs full attention,
    local vs global RoPE in Gemma), so the kwargs are recorded per block, from one dense pass that
    stops after the last block. They do not depend on the hidden states, so pruning earlier
    blocks does not change them.
    """
    hidden_in, kwargs_per_block = [], [[] for _ in blocks]
    last = len(blocks) - 1

    def hook(i):
        def fn(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden_in.append(hidden)
            kwargs_per_block[i].append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values",
                                                                                    "layer_past")})
            if i == last:
                raise StopForward
        return fn

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = device_of(model)
    try:
        for batch in batches:
            try:
                model(batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden_in, kwargs_per_block


def _block_output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _prune_with_norms(linears: dict[str, nn.Linear], norms, config: MagnitudeConfig, report: dict) -> None:
    for name, lin in linears.items():
        mask = keep_mask(lin.weight, wanda_scores(lin.weight, norms[name]), config)
        _apply(lin, mask)
        report[name] = 1 - mask.float().mean().item()


@torch.inference_mode()
def _wanda_sequential(model: nn.Module, batches, config: WandaConfig, filter_fn, progress: bool) -> dict[str, float]:
    """Wanda as in the paper's code: block by block, inputs taken from the already-pruned blocks."""
    prefix = {id(m): n for n, m in model.named_modules()}
    blocks = decoder_blocks(model)
    hidden, kwargs_per_block = _capture_block_inputs(model, blocks, batches)
    report = {}
    for i, block in enumerate(tqdm(blocks, desc="wanda", leave=False, disable=not progress)):
        states = list(zip(hidden, kwargs_per_block[i]))
        base = prefix[id(block)]
        linears = {f"{base}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        linears = {n: m for n, m in linears.items() if filter_fn(m, n)}
        collector = _NormCollector(linears)
        try:
            for hidden, kwargs in states:
                _block_output(block, hidden, kwargs)
        finally:
            collector.remove()
        _prune_with_norms(linears, collector.norms(), config, report)
        hidden = [_block_output(block, h, kwargs) for h, kwargs in states]
    # Linear layers outside the decoder blocks (selected by filter_fn) are pruned one-shot.
    rest = {n: m for n, m in prunable_linears(model, filter_fn).items() if n not in report}
    if rest:
        _prune_with_norms(rest, input_norms(model, calibration=batches, filter_fn=filter_fn), config, report)
    return report


def prune_(model: nn.Module, config, *, calibration=None, filter_fn=None,
           norms: dict[str, torch.Tensor] | None = None, progress: bool = False) -> Summary:
    """Prune a model in place; return a ``Summary``: {layer: sparsity} (structured: {"model": parameters removed}).

    ``MagnitudeConfig`` needs nothing else. ``WandaConfig`` needs ``calibration`` (a list of
    (B, T) token batches) or precomputed ``norms`` from ``input_norms`` (one-shot; handy for
    sweeping sparsities). Both write zeros into the Linear weights ``filter_fn(module, name)``
    selects (default: all but the head and the embeddings, which stay dense).
    ``StructuredConfig`` replaces the model's modules and config by its smaller rebuild (see
    ``prune_structured_``); ``calibration`` when the config needs it, no ``filter_fn`` or ``norms``.
    """
    if isinstance(config, StructuredConfig):
        if filter_fn is not None or norms is not None:
            raise ValueError("structured pruning keeps one config for all blocks: filter_fn and norms apply to "
                             "MagnitudeConfig / WandaConfig only")
        return prune_structured_(model, config, calibration=calibration, progress=progress)
    if not isinstance(config, MagnitudeConfig):
        raise ValueError(f"config={config!r}; allowed: MagnitudeConfig, WandaConfig or StructuredConfig")
    filter_fn = resolve_filter(filter_fn)
    check_linear_layout(model, "prune_")  # Conv1D / 3-D expert weights would stay dense silently
    linears = prunable_linears(model, filter_fn)
    if isinstance(config, WandaConfig):
        if norms is None:
            batches = as_batches(calibration)
            if config.sequential:
                if decoder_blocks(model) is None:
                    raise ValueError(f"{type(model).__name__}: sequential Wanda needs the decoder blocks and "
                                     "none were found; pass WandaConfig(sequential=False) for one-shot Wanda")
                return _summary(config, _wanda_sequential(model, batches, config, filter_fn, progress))
            norms = input_norms(model, calibration=batches, filter_fn=filter_fn, progress=progress)
        missing = [n for n in linears if n not in norms]
        if missing:
            raise ValueError(f"norms lack {len(missing)} layers (first: {missing[0]!r}); "
                             "compute them with input_norms(model, calibration=batches)")
        report = {}
        _prune_with_norms(linears, norms, config, report)
        return _summary(config, report)
    report = {}
    for name, lin in linears.items():
        mask = keep_mask(lin.weight, magnitude_scores(lin.weight), config)
        _apply(lin, mask)
        report[name] = 1 - mask.float().mean().item()
    return _summary(config, report)


def _summary(config: MagnitudeConfig, report: dict[str, float]) -> Summary:
    return Summary("prune_", {"type": type(config).__name__, **dataclasses.asdict(config)}, report, unit="sparsity")
