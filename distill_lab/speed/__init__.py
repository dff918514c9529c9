"""Speed comparisons the lessons run: kernels against their float baseline, measured in one process.

Every function here times with ``distill_lab.timing.median_seconds`` and reports ratios against a
baseline measured in the same call, because a ratio is true only for the machine it ran on.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "pruning": ["compare_speed", "semi_structured_speed"],
    "quantization": ["KERNEL_SHAPES", "format_kernel_table", "kernel_benchmark"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
