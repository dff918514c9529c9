"""distill_lab: the helper package of a hands-on course on making an LLM smaller and faster.

The lessons import the core from here (``import distill_lab as dl``) and each technique from
its own module: ``distill_lab.distillation``, ``distill_lab.quantize``, ``distill_lab.prune``,
``distill_lab.pipeline``.
"""

from ._startup import frozen_imports as _frozen_imports

with _frozen_imports():  # torch + transformers: ~570k import-time objects; see _startup.py
    from .claims import ClaimError, claim, verdict  # noqa: F401
    from .data import (calibration_batches, corpus_windows, load_corpus, token_windows,  # noqa: F401
                       tokenize)
    from .evaluate import (Result, environment_info, generate_samples, latency,  # noqa: F401
                           model_size_bytes, peak_memory, perplexity, record)
    from .models import (check_vocab_compatible, count_parameters, load_model,  # noqa: F401
                         load_teacher, make_student, tiny_llama)
    from .profiles import Profile, default_device, get_profile, set_seed  # noqa: F401

__version__ = "0.1.0"
