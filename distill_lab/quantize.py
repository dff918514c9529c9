# shim for the issue-13 move; removed when the restructure is merged
"""Deprecated path: quantization moved to ``distill_lab.quantization`` (views and timings to ``views`` / ``speed``)."""

from .quantization.api import (QuantizationSummary, compression_report, fp32_equivalent_bytes,
                               memory_bytes, quantize_, quantize_embedding_and_head_)
from .quantization.configs import (CONFIGS, Int4WeightOnlyConfig, Int8DynamicConfig,
                                   Int8WeightOnlyConfig, SmoothQuantConfig, config_from_dict, config_to_dict)
from .quantization.configs import DEPRECATED_NAMES as _DEPRECATED_NAMES
from .quantization.configs import deprecated_config as _deprecated_config
from .quantization.kernels import (INT4_KERNEL_GROUPS, INT8_PACK_MAX_ROWS, int4_codes_and_scales,
                                   int4_kernel_codes, int4_layout_for, int4_mm, int8_weight_only_backend,
                                   int8_weight_only_mm, int_mm, int_mm_ok, kernels_enabled, pack_int4, unpack_int4,
                                   use_kernels)
from .quantization.modules import (W8A8_CHUNK_ELEMENTS, Int4WeightOnlyLinear, Int8DynamicLinear,
                                   Int8Embedding, Int8WeightOnlyLinear, QuantizedModule)
from .quantization.primitives import (MAX_BITS, MIN_BITS, SCALE_EPS, Granularity, QuantizedTensor,
                                      clip_weight_, dequantize, fake_quantize, quantization_error, quantize_tensor,
                                      search_clip_ratios, sqnr_db)
from .quantization.serialization import (FORMAT, QCONFIG_NAME, WEIGHTS_NAME, load_quantized,
                                         save_quantized, saved_size_bytes)
from .speed.quantization import KERNEL_SHAPES, format_kernel_table, kernel_benchmark
from .views.quantization import GRANULARITY_OPTIONS as GRANULARITIES
from .views.quantization import quantization_view

__all__ = ["CONFIGS", "FORMAT", "GRANULARITIES", "Granularity", "INT4_KERNEL_GROUPS", "INT8_PACK_MAX_ROWS",
           "Int4WeightOnlyConfig", "Int4WeightOnlyLinear", "Int8DynamicConfig", "Int8DynamicLinear", "Int8Embedding",
           "Int8WeightOnlyConfig", "Int8WeightOnlyLinear", "KERNEL_SHAPES", "MAX_BITS", "MIN_BITS", "QCONFIG_NAME",
           "QuantizationSummary", "QuantizedModule", "QuantizedTensor", "SCALE_EPS", "SmoothQuantConfig",
           "W8A8_CHUNK_ELEMENTS", "WEIGHTS_NAME", "clip_weight_", "compression_report", "config_from_dict",
           "config_to_dict", "dequantize", "fake_quantize", "format_kernel_table", "fp32_equivalent_bytes",
           "int4_codes_and_scales", "int4_kernel_codes", "int4_layout_for", "int4_mm", "int8_weight_only_backend",
           "int8_weight_only_mm", "int_mm", "int_mm_ok", "kernel_benchmark", "kernels_enabled", "load_quantized",
           "memory_bytes", "pack_int4", "quantization_error", "quantization_view", "quantize_",
           "quantize_embedding_and_head_", "quantize_tensor", "save_quantized", "saved_size_bytes",
           "search_clip_ratios", "sqnr_db", "unpack_int4", "use_kernels"]


def __getattr__(name: str):  # Int8WeightOnly, Int8Dynamic, Int4WeightOnly: with a DeprecationWarning
    if name in _DEPRECATED_NAMES:
        return _deprecated_config(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
