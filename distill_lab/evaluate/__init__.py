"""Measure a language model: its quality, its task accuracy, its cost to run, and the record of a result.

* ``quality``: perplexity (per token, per word, bits per byte), generations, repeated n-grams.
* ``accuracy``: ``task_accuracy`` through EleutherAI's lm-evaluation-harness (optional, ``pip install lm-eval``)
  on the offline tasks of ``tasks/`` or the harness's own; ``harness`` wraps a model for it.
* ``cost``: prefill and decode speed (``latency``, the one harness ``phase_probes``), peak memory.
* ``records``: ``environment_info``, the ``Result`` record and ``record`` (what ``make run`` collects).

Every public name is re-exported here: ``from distill_lab.evaluate import perplexity``.
"""

from .accuracy import check_tasks, format_accuracy, task_accuracy
from .cost import compare_speed, latency, peak_memory, phase_probes, speed_row, timing_prompts
from .harness import LM_EVAL_HINT, harness_lm, require_lm_eval
from .quality import (generate_continuations, generate_samples, next_token_logits, perplexity, perplexity_units,
                      repeated_ngram_share, token_nll)
from .records import REPORT_ENV, Result, environment_info, record

__all__ = ["LM_EVAL_HINT", "REPORT_ENV", "Result", "check_tasks", "compare_speed", "environment_info",
           "format_accuracy", "generate_continuations", "generate_samples", "harness_lm", "latency", "next_token_logits",
           "peak_memory", "perplexity", "perplexity_units", "phase_probes", "record", "repeated_ngram_share",
           "require_lm_eval", "speed_row", "task_accuracy", "timing_prompts", "token_nll"]
