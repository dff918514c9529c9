"""Quantization with real integer kernels, in layers the way torchao separates them.

* ``primitives``: codes and scales of one tensor (``quantize_tensor``, ``fake_quantize``, SQNR,
  clipping search) and ``Granularity``.
* ``kernels``: the int8/int4 matmuls with their pure-PyTorch fallbacks (``use_kernels(False)``).
* ``configs``: ``Int8WeightOnlyConfig``, ``Int8DynamicConfig`` (W8A8), ``Int4WeightOnlyConfig``,
  ``SmoothQuantConfig``.
* ``modules``: the quantized Linear and Embedding types.
* ``api``: ``quantize_(model, config, filter_fn)`` and the size measurements.
* ``serialization``: ``save_quantized`` / ``load_quantized``.
* ``smoothquant``, ``awq``, ``gptq``: calibrated transforms, config first and calibration by keyword:
  ``smooth_(model, SmoothQuantConfig(), calibration=stats)``, ``awq_(model, Int4WeightOnlyConfig(),
  calibration=stats)``, ``gptq_(model, Int4WeightOnlyConfig(), calibration=batches)``.

QAT lives in ``distill_lab.qat``. The old config names (``Int8WeightOnly``, ``Int8Dynamic``,
``Int4WeightOnly``) still resolve here, with a DeprecationWarning, for one release.
"""

from .api import (QuantizationSummary, compression_report, fp32_equivalent_bytes, memory_bytes, quantize_,
                  quantize_embedding_and_head_)
from .awq import awq_
from .configs import (DEPRECATED_NAMES, Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                      SmoothQuantConfig, config_from_dict, config_to_dict, deprecated_config)
from .gptq import gptq_
from .modules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8Embedding, Int8WeightOnlyLinear, QuantizedModule
from .primitives import (Granularity, QuantizedTensor, clip_weight_, dequantize, fake_quantize, quantization_error,
                         quantize_tensor, search_clip_ratios, sqnr_db)
from .serialization import load_quantized, save_quantized, saved_size_bytes
from .smoothquant import ActivationStats, collect_activation_stats, outlier_table, smooth_

__all__ = ["ActivationStats", "Granularity", "Int4WeightOnlyConfig", "Int4WeightOnlyLinear", "Int8DynamicConfig",
           "Int8DynamicLinear", "Int8Embedding", "Int8WeightOnlyConfig", "Int8WeightOnlyLinear",
           "QuantizationSummary", "QuantizedModule", "QuantizedTensor", "SmoothQuantConfig", "awq_", "clip_weight_",
           "collect_activation_stats", "compression_report", "config_from_dict", "config_to_dict", "dequantize",
           "fake_quantize", "fp32_equivalent_bytes", "gptq_", "load_quantized", "memory_bytes", "outlier_table",
           "quantization_error", "quantize_", "quantize_embedding_and_head_", "quantize_tensor", "save_quantized",
           "saved_size_bytes", "search_clip_ratios", "smooth_", "sqnr_db"]


def __getattr__(name: str):
    if name in DEPRECATED_NAMES:
        return deprecated_config(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
