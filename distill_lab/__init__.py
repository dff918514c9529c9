"""distill_lab: the helper package of a hands-on course on making an LLM smaller and faster.

The lessons import the core from here (``import distill_lab as dl``): the teacher, data, perplexity,
task accuracy (``task_accuracy``: lm-evaluation-harness, imported only when called) and claims. Each
technique is a subpackage (``distillation``, ``quantization``, ``pruning``), recipes combining them are
``pipeline``; their entry points are re-exported here too and load on first use (``dl.quantize_``,
``dl.Int4WeightOnlyConfig``, ``dl.prune_``, ``dl.DistillationTrainer``, ...). docs/architecture.md
explains the layers.
"""

from ._lazy import lazy_exports
from ._startup import frozen_imports as _frozen_imports

with _frozen_imports():  # torch + transformers: ~570k import-time objects; see _startup.py
    from .arch import parameter_count
    from .claims import ClaimError, claim, verdict
    from .data import calibration_batches, corpus_windows, load_corpus, token_windows, tokenize
    from .evaluate import (Result, compare_speed, environment_info, generate_continuations, generate_samples, latency,
                           peak_memory, perplexity, record, repeated_ngram_share, task_accuracy)
    from .models import check_vocab_compatible, load_model, load_teacher, make_student, tiny_llama
    from .profiles import Profile, default_device, get_profile, set_seed
    from .tensors import memory_bytes

_CORE = ["ClaimError", "Profile", "Result", "calibration_batches", "check_vocab_compatible", "claim", "compare_speed",
         "corpus_windows", "default_device", "environment_info", "generate_continuations", "generate_samples",
         "get_profile", "latency", "load_corpus", "load_model", "load_teacher", "make_student", "memory_bytes",
         "parameter_count", "peak_memory", "perplexity", "record", "repeated_ngram_share", "set_seed", "task_accuracy",
         "tiny_llama", "token_windows", "tokenize", "verdict"]
_EXPORTS = {
    "distillation": ["DistillationLoss", "DistillationTrainer", "TrainConfig", "cache_teacher_logits"],
    "pipeline": ["Recipe", "run_recipe"],
    "pruning": ["MagnitudeConfig", "StructuredConfig", "WandaConfig", "heal", "prune_", "prune_structured"],
    "quantization": ["Int4WeightOnlyConfig", "Int8DynamicConfig", "Int8WeightOnlyConfig", "SmoothQuantConfig",
                     "awq_", "gptq_", "quantize_", "smooth_"],
    "serialization": ["load_saved", "save_model", "weights_bytes"],
}
_lazy_all, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_CORE + _lazy_all)
__version__ = "0.1.0"
