"""What an in-place technique did to a model: the one return type of every ``*_`` function that changes a model.

``quantize_``, ``gptq_``, ``awq_``, ``smooth_``, ``prepare_qat_``, ``convert_``, ``prune_``,
``prune_structured_``, ``to_sparse_csr_`` and ``to_semi_structured_`` all return a ``Summary``
(``quantize_`` and friends a ``QuantizationSummary``, its subclass with the replaced kinds). A summary
is a read-only mapping ``{module name: what changed there}`` (a sparsity, a smoothing scale, an AWQ
exponent, a module kind), so ``summary["model.layers.0.mlp.down_proj"]`` and ``len(summary)`` work
the same for every technique, plus ``kept``: the modules it left alone, each with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Summary"]


@dataclass(repr=False, eq=False)  # equality: Mapping's, over ``changed``
class Summary(Mapping):
    """``technique`` changed ``changed`` ({module name: value}, the values are ``unit``) and left ``kept`` alone."""

    technique: str  # the function's name, e.g. "prune_"
    config: dict = field(default_factory=dict)  # the config it ran with, as a dict
    changed: dict = field(default_factory=dict)  # module name -> what changed there
    kept: dict = field(default_factory=dict)  # module name -> why it was left unchanged
    unit: str = ""  # what the values of ``changed`` are ("sparsity", "smoothing scale", ...)

    def __getitem__(self, name: str):
        return self.changed[name]

    def __iter__(self):
        return iter(self.changed)

    def __len__(self) -> int:
        return len(self.changed)

    def __repr__(self) -> str:
        what = f"{len(self.changed)} modules" + (f" ({self.unit})" if self.unit else "")
        kept = "; ".join(f"{k} ({v})" for k, v in self.kept.items()) or "none"
        return f"Summary({self.technique}: {what} changed; left alone: {kept})"
