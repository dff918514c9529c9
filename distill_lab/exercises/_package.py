"""The one place where the exercises import the package's techniques and tools (the references they check against)."""

from ..arch import adapter, parameter_count
from ..distillation import KD_TEMPERATURE, DistillationLoss, TopKLogits
from ..distillation.on_policy import generated_labels, on_policy_divergence, sample_continuations
from ..models import tiny_llama
from ..pipeline.runner import HEALING_STEPS
from ..profiles import set_seed
from ..pruning.masks import nm_mask, unstructured_mask
from ..quantization.gptq import gptq_quantize_weight
from ..quantization.primitives import FakeQuantize, fake_quantize, quantize_tensor, sqnr_db
from ..speed.roofline import decode_time_shares, memory_bandwidth

__all__ = ["HEALING_STEPS", "KD_TEMPERATURE", "DistillationLoss", "FakeQuantize", "TopKLogits", "adapter", "decode_time_shares", "fake_quantize",
           "generated_labels", "gptq_quantize_weight", "memory_bandwidth", "nm_mask", "on_policy_divergence",
           "parameter_count", "quantize_tensor", "sample_continuations", "set_seed", "sqnr_db", "tiny_llama",
           "unstructured_mask"]
