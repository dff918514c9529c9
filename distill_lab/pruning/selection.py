"""What a pruning pass touches and reads: which Linear layers (``filter_fn``) and the calibration batches.

Layer selection works as in ``quantize_``: ``filter_fn(module, name) -> bool`` says whether a
``nn.Linear`` is pruned. The default leaves the output head and the embeddings dense
(``default_filter``); ``exclude_globs(patterns)`` builds a filter from fnmatch patterns of module
names.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "StopForward", "as_batches", "default_filter", "exclude_globs", "prunable_linears",
           "resolve_filter"]

DEFAULT_EXCLUDE = ("lm_head", "*embed*")  # module names the default filter leaves dense (fnmatch patterns)

FilterFn = Callable[[nn.Module, str], bool]


def exclude_globs(patterns: Iterable[str] | str) -> FilterFn:
    """A ``filter_fn`` that selects every layer whose name matches none of the fnmatch ``patterns``."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)

    def filter_fn(module: nn.Module, name: str) -> bool:
        return not any(fnmatch.fnmatch(name, p) for p in patterns)

    filter_fn.patterns = patterns  # what it excludes, for a reader
    return filter_fn


default_filter = exclude_globs(DEFAULT_EXCLUDE)  # all Linear layers but the output head and the embeddings


def resolve_filter(filter_fn: FilterFn | None = None) -> FilterFn:
    """The ``filter_fn`` to use: the given callable, or ``default_filter`` for None.

    Glob patterns are not a filter: ``exclude_globs(patterns)`` turns them into one.
    """
    if filter_fn is None:
        return default_filter
    if callable(filter_fn):
        return filter_fn
    hint = " (for glob patterns pass exclude_globs(patterns))" if isinstance(filter_fn, (str, tuple, list)) else ""
    raise ValueError(f"filter_fn={filter_fn!r}; allowed: None or a callable (module, name) -> bool{hint}")


def prunable_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """Return ``{name: Linear}`` for every ``nn.Linear`` that ``filter_fn(module, name)`` selects.

    ``filter_fn`` None: every Linear except the output head and the embeddings (``default_filter``).
    """
    filter_fn = resolve_filter(filter_fn)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and filter_fn(module, name)}


def as_batches(calibration) -> list[torch.Tensor]:
    """The calibration batches as a list of (B, T) token tensors; a clear ValueError when there are none."""
    if calibration is None:
        raise ValueError("this method needs calibration batches: pass calibration=[(B, T) token tensors] "
                         "(e.g. distill_lab.calibration_batches(windows, n, batch_size))")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration] if calibration.dim() == 2 else list(calibration)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty; pass at least one (B, T) batch of token ids")
    return batches


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (later layers are not run)."""
