"""Lesson views: the numbers a widget or a figure shows, computed from a model or a tensor.

A view returns plain data (dicts, lists, tensors); ``distill_lab.plotting`` draws it and
``distill_lab.widgets`` wires it to knobs. No technique module imports a view.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "baseline": ["entropy_bits", "temperature_probs", "temperature_view", "top_tokens"],
    "combined": ["QUANTIZE_KNOBS", "recipe_from_knobs"],
    "distillation": ["distillation_view"],
    "pruning": ["PRUNING_IMPORTANCE", "describe", "layer_pruning_view", "linear_inputs", "sparsity_curve",
                "sparsity_curve_view"],
    "quantization": ["GRANULARITY_OPTIONS", "quantization_view", "scale_layout"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
