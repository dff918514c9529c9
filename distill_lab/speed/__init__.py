"""Speed comparisons the lessons run, measured in one process (quantized kernels: ``quantization.dispatch``).

Every function here times with ``distill_lab.timing.median_seconds`` and reports ratios against a
baseline measured in the same call, because a ratio is true only for the machine it ran on.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "pruning": ["compare_speed", "semi_structured_speed"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
