"""Measure a language model, in three modules: its quality, its cost to run, and the record of a result.

* ``quality``: perplexity (per token, per word, bits per byte), generations, repeated n-grams.
* ``cost``: prefill and decode speed (``latency``, the one harness ``phase_probes``), peak memory.
* ``records``: ``environment_info``, the ``Result`` record and ``record`` (what ``make run`` collects).

Every public name is re-exported here: ``from distill_lab.evaluate import perplexity``.
"""

from .cost import compare_speed, latency, peak_memory, phase_probes, speed_row, timing_prompts
from .quality import (generate_continuations, generate_samples, next_token_logits, perplexity, perplexity_units,
                      repeated_ngram_share, token_nll)
from .records import REPORT_ENV, Result, environment_info, record

__all__ = ["REPORT_ENV", "Result", "compare_speed", "environment_info", "generate_continuations", "generate_samples", "latency",
           "next_token_logits", "peak_memory", "perplexity", "perplexity_units", "phase_probes", "record",
           "repeated_ngram_share", "speed_row", "timing_prompts", "token_nll"]
