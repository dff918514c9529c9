# shim for the issue-13 move; removed when the restructure is merged
"""Deprecated path: GPTQ moved to ``distill_lab.quantization.gptq``."""

from .quantization.gptq import collect_hessians, gptq_, gptq_quantize_weight, prepare_hessian

__all__ = ["collect_hessians", "gptq_", "gptq_quantize_weight", "prepare_hessian"]
