"""The format registry: a quantization format is registered once, and everything that handles formats asks here.

A format is a config type (``Int4WeightOnlyConfig``) with a ``FormatSpec`` that says how to turn
an ``nn.Linear`` into the format's module (``quantize_``), how to fake-quantize a weight the same
way (QAT), which module kinds it writes and, for each kind (``ModuleFormat``), how to rebuild it
from a saved folder and how to write it to GGUF. torchao registers its configs' handlers the same
way (``register_quantize_module_handler``). ``quantization/formats.py`` registers the built-in
formats; a new one is one module that calls ``register_format`` (docs/architecture.md).

Low on purpose: it knows no format, only the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FormatSpec", "ModuleFormat", "config_type", "config_types", "format_for", "format_names", "module_format",
           "quantize_knobs", "register_format", "register_module", "unregister_format"]


def _always(in_features: int, config) -> bool:
    return True


def _no_act_fake_quant(config) -> None:
    return None


@dataclass(frozen=True)
class ModuleFormat:
    """One saved module kind (``QuantizedModule.kind``): how it comes back from a folder and goes to GGUF.

    ``rebuild(tensors, spec, device)`` builds the module from its ``export_tensors()`` and ``spec()``
    (the saved folder's keys). ``to_ggml(module)`` returns a ``ggml.GGMLTensor``, or None where this
    module's layout has no ggml block type (its float weight is written instead); a format with
    ``to_ggml=None`` is not exportable to GGUF at all (``export.to_gguf`` raises). ``tied(embedding,
    spec)`` builds a head saved as sharing an embedding's tensors (None: this kind is never tied).
    ``kernel`` names the ``dispatch`` format whose measured CPU paths the module follows.
    """

    kind: str
    rebuild: Callable
    to_ggml: Callable | None = None
    tied: Callable | None = None
    kernel: str | None = None

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"ModuleFormat.kind={self.kind!r}; allowed: a non-empty string")
        if not callable(self.rebuild):
            raise ValueError(f"ModuleFormat.rebuild={self.rebuild!r}; allowed: a callable (tensors, spec, device)")


@dataclass(frozen=True)
class FormatSpec:
    """What a config type quantizes to: one entry per thing ``quantize_``, QAT, saving and export need.

    ``from_float(linear, config)`` -> the quantized module (duck-typed: anything with ``.weight``,
    ``.bias``, ``.in_features``); ``fits(in_features, config)`` says whether a Linear can take the
    format (False: it stays in float, e.g. int4 groups that do not divide its inputs);
    ``weight_fake_quant(config)`` / ``act_fake_quant(config)`` -> the QAT fake-quantizers with the
    same rounding (``act_fake_quant`` returns None for weight-only formats); ``modules``: the kinds
    it writes; ``format``: its name in recipes (a quantize step's ``format:``, looked up with
    ``config_type``); ``knobs``: the notebook panel's labels for it, ``{label: algorithm}``.
    """

    format: str
    from_float: Callable
    weight_fake_quant: Callable
    modules: tuple = ()
    fits: Callable = _always
    act_fake_quant: Callable = _no_act_fake_quant
    knobs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.format, str) or not self.format:
            raise ValueError(f"FormatSpec.format={self.format!r}; allowed: a non-empty name such as 'int4'")
        for name in ("from_float", "weight_fake_quant", "fits", "act_fake_quant"):
            if not callable(getattr(self, name)):
                raise ValueError(f"FormatSpec.{name}={getattr(self, name)!r}; allowed: a callable")
        bad = [m for m in self.modules if not isinstance(m, ModuleFormat)]
        if bad:
            raise ValueError(f"FormatSpec.modules holds {bad!r}; allowed: ModuleFormat entries")


_FORMATS: dict[type, FormatSpec] = {}  # config type -> its format, in registration order
_MODULES: dict[str, ModuleFormat] = {}  # module kind -> how it is rebuilt and exported


def register_module(module: ModuleFormat) -> ModuleFormat:
    """Register one module kind (a format's own kinds register with ``register_format``)."""
    if module.kind in _MODULES:
        raise ValueError(f"module kind {module.kind!r} is already registered; allowed: a new kind")
    _MODULES[module.kind] = module
    return module


def register_format(config_type: type, spec: FormatSpec) -> FormatSpec:
    """Register ``config_type``'s format and its module kinds, in one place; returns ``spec``."""
    if not isinstance(config_type, type):
        raise ValueError(f"config_type={config_type!r}; allowed: a config class")
    if config_type in _FORMATS:
        raise ValueError(f"{config_type.__name__} is already registered; allowed: a config type not yet registered")
    if spec.format in format_names():
        raise ValueError(f"format {spec.format!r} is already registered; allowed: a name not in "
                         f"{', '.join(format_names())}")
    taken = [m.kind for m in spec.modules if m.kind in _MODULES]
    if taken:
        raise ValueError(f"module kinds {taken} are already registered; allowed: kinds of this format only")
    for m in spec.modules:
        _MODULES[m.kind] = m
    _FORMATS[config_type] = spec
    return spec


def unregister_format(config_type: type) -> None:
    """Remove ``config_type``'s format and its module kinds (tests that register a toy format clean up with it)."""
    spec = _FORMATS.pop(config_type, None)
    if spec is None:
        raise ValueError(f"{getattr(config_type, '__name__', config_type)} is not registered; "
                         f"allowed: {', '.join(c.__name__ for c in _FORMATS)}")
    for m in spec.modules:
        _MODULES.pop(m.kind, None)


def config_types() -> tuple[type, ...]:
    """The registered config types, in registration order."""
    return tuple(_FORMATS)


def format_names() -> tuple[str, ...]:
    """The registered formats' names (``FormatSpec.format``), in registration order."""
    return tuple(spec.format for spec in _FORMATS.values())


def config_type(format: str) -> type:
    """The config type registered under the format name ``format`` (what a recipe's ``format:`` names)."""
    for cls, spec in _FORMATS.items():
        if spec.format == format:
            return cls
    raise ValueError(f"format={format!r}; allowed: {', '.join(format_names())}")


def format_for(config) -> FormatSpec:
    """The ``FormatSpec`` of ``config``'s type (exact type: a subclass registers its own)."""
    spec = _FORMATS.get(type(config))
    if spec is None:
        raise ValueError(f"config={config!r}; allowed: an instance of "
                         f"{', '.join(c.__name__ for c in _FORMATS)}")
    return spec


def module_format(kind: str) -> ModuleFormat:
    """The ``ModuleFormat`` of a saved module kind."""
    if kind not in _MODULES:
        raise ValueError(f"unknown quantized module kind {kind!r}; allowed: {', '.join(_MODULES)}")
    return _MODULES[kind]


def quantize_knobs() -> dict[str, tuple[str, str]]:
    """The notebook panel's quantize choices of every registered format: ``{label: (format, algorithm)}``."""
    return {label: (spec.format, algorithm) for spec in _FORMATS.values() for label, algorithm in spec.knobs.items()}

