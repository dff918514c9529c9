"""Lazy re-exports for a subpackage's ``__init__`` (PEP 562).

``quantization`` and ``pruning`` have low modules (number formats, layer types, sparse storage) that
``serialization`` and ``models`` import, and high ones (QAT, healing) that train through
``distillation``. An eager ``__init__`` would run the high ones whenever a low one is imported and
close a cycle; a lazy one imports a submodule only when one of its names is first used::

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {"api": ["quantize_", ...], ...})
"""

from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, list[str]], fallback=None):
    """(``__all__``, ``__getattr__``, ``__dir__``) for ``{submodule: [names]}``, imported on first use.

    ``fallback(name)`` is tried for names not exported (e.g. deprecated aliases) before AttributeError.
    """
    names = {name: module for module, listed in exports.items() for name in listed}
    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            globals_ = importlib.import_module(package).__dict__
            globals_[name] = value  # cache: later lookups do not come here
            return value
        if fallback is not None:
            return fallback(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(names) | set(importlib.import_module(package).__dict__))

    return sorted(names), __getattr__, __dir__
