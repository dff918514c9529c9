"""Quantization with real integer kernels, in layers the way torchao separates them.

* ``primitives``: codes and scales of one tensor (``quantize_tensor``, ``fake_quantize``, SQNR,
  clipping search) and ``Granularity``.
* ``kernels``: the int8/int4 matmuls with their pure-PyTorch fallbacks (``use_kernels(False)``).
* ``configs``: ``Int8WeightOnlyConfig``, ``Int8DynamicConfig`` (W8A8), ``Int4WeightOnlyConfig``,
  ``SmoothQuantConfig``.
* ``modules``: the quantized Linear and Embedding types; ``embeddings``: the int4 embedding
  (``embedding_bits=4``) whose tied head shares its packed codes.
* ``api``: ``quantize_(model, config, filter_fn)`` and the size measurements.
* ``serialization``: ``save_quantized`` / ``load_quantized``.
* ``smoothquant``, ``awq``, ``gptq``: calibrated transforms, config first and token batches by keyword:
  ``smooth_(model, SmoothQuantConfig(), calibration=batches)``, ``awq_(model, Int4WeightOnlyConfig(),
  calibration=batches)`` (or ``stats=`` their precomputed ``ActivationStats``),
  ``gptq_(model, Int4WeightOnlyConfig(), calibration=batches)``.

* ``qat``: quantization-aware training (``prepare_qat_``, ``train_qat`` on the one training loop, ``convert_``).
* ``registry``: one entry per format (``register_format``): its ``from_float``, QAT fake-quantizer, rebuild
  from a saved folder and GGUF mapping; ``formats`` registers the built-in ones, ``ggml`` builds GGUF blocks.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "api": ["QuantizationSummary", "compression_report", "dequantize_", "fp32_equivalent_bytes", "memory_bytes", "quantize_",
            "quantize_embedding_and_head_"],
    "awq": ["awq_"],
    "configs": ["EMBEDDING_BITS", "Int4WeightOnlyConfig", "Int8DynamicConfig", "Int8WeightOnlyConfig",
                "QuantizationConfig", "SmoothQuantConfig", "config_from_dict", "config_to_dict"],
    "embeddings": ["INT4_EMBEDDING_GROUP", "Int4Embedding"],
    "gptq": ["gptq_"],
    "modules": ["Int4WeightOnlyLinear", "Int8DynamicLinear", "Int8Embedding", "Int8WeightOnlyLinear",
                "QuantizedModule"],
    "primitives": ["FakeQuantize", "Granularity", "QuantizedTensor", "clip_weight_", "dequantize", "fake_quantize",
                   "quantization_error", "quantize_tensor", "search_clip_ratios", "sqnr_db"],
    "qat": ["QATLinear", "convert_", "prepare_qat_", "train_qat"],
    "registry": ["FormatSpec", "ModuleFormat", "register_format", "unregister_format"],
    "serialization": ["load_quantized", "save_quantized"],
    "smoothquant": ["ActivationStats", "collect_activation_stats", "outlier_table", "smooth_"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
