# shim for the issue-13 move; removed when the restructure is merged
"""Deprecated path: SmoothQuant moved to ``distill_lab.quantization.smoothquant``, AWQ to ``distill_lab.quantization.awq``."""

from .quantization.awq import awq_
from .quantization.smoothquant import (ActivationStats, SmoothGroup, collect_activation_stats,
                                       outlier_table, smooth_, smoothing_groups)

__all__ = ["ActivationStats", "SmoothGroup", "awq_", "collect_activation_stats", "outlier_table", "smooth_",
           "smoothing_groups"]
