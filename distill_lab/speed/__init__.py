"""Speed comparisons the lessons run, measured in one process (quantized kernels: ``quantization.dispatch``).

Every function here times round-robin with ``distill_lab.timing.interleaved_times`` and reports
``SpeedRatio``s against a baseline timed in the same rounds, because a ratio is true only for the machine it ran on.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "pruning": ["semi_structured_speed"],
    "roofline": ["MATMUL_OPS", "decode_time_shares", "memory_bandwidth"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
