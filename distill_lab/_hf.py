"""Hugging Face transformers, quietly: the one place that turns its info logs and progress bars down.

Low on purpose (imports only transformers' logging), so that every layer that loads or saves a model
can use it: ``pruning.sparse_storage`` as well as ``models``, which re-exports it.
"""

from __future__ import annotations

import contextlib

from transformers.utils import logging as hf_logging

__all__ = ["quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' info logs and per-tensor progress bars during a load."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
