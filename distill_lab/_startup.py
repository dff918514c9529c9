"""Import torch and transformers without paying for garbage collection of their module objects.

Importing ``torch`` and ``transformers`` creates about 570,000 long-lived objects (module
dictionaries, functions, sympy caches). While they are created, CPython's cyclic garbage collector
runs full collections over all of them (≈ 0.6 s on 2 cores), every later full collection walks them
again, and the last one at interpreter exit costs another ≈ 0.7 s. None of them can ever be
garbage: modules live until the interpreter ends.

``frozen_imports()`` pauses the collector while the package's imports run, then moves everything
that exists at that moment into the collector's permanent generation with ``gc.freeze()``, so later
collections skip it. Objects created afterwards are collected as usual. Set
``DISTILL_LAB_GC_FREEZE=0`` to import with the interpreter's default behaviour
(``benchmarks/startup.py`` compares both).

Reference: https://docs.python.org/3/library/gc.html#gc.freeze
"""

from __future__ import annotations

import contextlib
import gc
import os

__all__ = ["ENV_VAR", "freeze_enabled", "frozen_imports"]

ENV_VAR = "DISTILL_LAB_GC_FREEZE"


def freeze_enabled() -> bool:
    """Whether package import freezes the import-time objects (``DISTILL_LAB_GC_FREEZE``, on by default)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in {"0", "1", "false", "true", "no", "yes", "off", "on", ""}:
        raise ValueError(f"{ENV_VAR}={value!r} is not understood; use 1 (default) or 0")
    return value not in {"0", "false", "no", "off"}


@contextlib.contextmanager
def frozen_imports():
    """Run the block with the collector paused, then freeze what exists and restore its state."""
    if not freeze_enabled():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
