"""What to quantize to: one dataclass per scheme, validated on construction, serializable to a dict.

The configs follow torchao's (``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``,
``Int4WeightOnlyConfig``): ``quantize_(model, config)`` reads them, and so do ``awq_``, ``gptq_``
and QAT. ``SmoothQuantConfig`` holds the knob of ``smooth_``.

Files saved before the configs took the ``Config`` suffix name them ``Int8WeightOnly``,
``Int8Dynamic`` and ``Int4WeightOnly``: ``config_from_dict`` still reads them. A config type
registered as a format (``registry.register_format``) reads back too.

``embedding_bits`` (every config, declared once in ``QuantizationConfig``): 8 quantizes the token
embedding per row to int8 and the output head with it; 4 quantizes it to asymmetric int4 groups of
64 along the hidden dim and runs a tied head on the int4 weight-only kernel over the same packed
codes (an untied head gets its own int4 weights); None keeps both in float.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .int4_kernels import INT4_KERNEL_GROUPS
from .primitives import Granularity
from .registry import config_types

__all__ = ["EMBEDDING_BITS", "Int4WeightOnlyConfig", "Int8DynamicConfig", "Int8WeightOnlyConfig", "QuantizationConfig",
           "SmoothQuantConfig", "config_from_dict", "config_to_dict"]


def _check_choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")


# the allowed embedding_bits, each with its label in notebook 04's panel (int4: the head on the int4 kernel)
EMBEDDING_BITS = {4: "int4 (groups of 64)", 8: "int8 (per row)", None: "float"}


@dataclass
class QuantizationConfig:
    """What every format's config holds besides its grid: ``embedding_bits``, declared here once.

    Keyword-only, so each format's own fields keep their positions; a subclass's ``__post_init__``
    calls this one.
    """

    embedding_bits: int | None = field(default=8, kw_only=True)  # 8: embedding and (tied) head to int8; 4: int4
    # groups of 64; None: both stay in float

    def __post_init__(self):
        if isinstance(self.embedding_bits, bool) or self.embedding_bits not in EMBEDDING_BITS:
            raise ValueError(f"{type(self).__name__}.embedding_bits={self.embedding_bits!r}; allowed: None (keep the "
                             "embedding and tied head in float), 8 or 4")


@dataclass
class Int8WeightOnlyConfig(QuantizationConfig):
    """int8 weights (per output channel), bf16 activations: ``aten._weight_int8pack_mm``."""


@dataclass
class Int8DynamicConfig(QuantizationConfig):
    """W8A8: int8 weights (per channel) and int8 activations (dynamic scales), integer matmul ``torch._int_mm``."""

    act_granularity: Granularity | str = "per_token"  # 'per_token' (one scale per row) or 'per_tensor' (one per call)
    weight_granularity: Granularity | str = "per_channel"  # 'per_channel' (one scale per output row) or 'per_tensor'
    head: str = "weight_only"  # int8 head: 'weight_only' (bf16 activations, the usual choice) or 'w8a8'

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        self.act_granularity = Granularity.parse(self.act_granularity, f"{owner}.act_granularity",
                                                 (Granularity.PER_TOKEN, Granularity.PER_TENSOR))
        _check_choice(owner, "head", self.head, ("weight_only", "w8a8"))
        self.weight_granularity = Granularity.parse(self.weight_granularity, f"{owner}.weight_granularity",
                                                    (Granularity.PER_CHANNEL, Granularity.PER_TENSOR))
        if self.embedding_bits == 4 and self.head == "w8a8":
            raise ValueError(f"{owner}.head='w8a8' with embedding_bits=4; allowed: head='weight_only' (an int4 "
                             "embedding's head runs the int4 weight-only kernel) or embedding_bits 8 or None")


@dataclass
class Int4WeightOnlyConfig(QuantizationConfig):
    """Group-wise int4 weights packed two per byte, bf16 activations: ``aten._weight_int4pack_mm[_for_cpu]``.

    ``bits`` below 4 (3 or 2) keeps the same 4-bit container and kernel with fewer levels used:
    a harder grid for experiments (QAT), not a smaller file.
    """

    group_size: int = 64  # weights per scale along the input dim; kernels take 32, 64, 128, 256
    symmetric: bool = False  # False: min/max grid with a zero per group; True: absmax grid, no zeros stored
    bits: int = 4  # levels actually used: 2**bits (2, 3 or 4)

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2 \
                or self.group_size % 2:
            raise ValueError(f"{owner}.group_size={self.group_size!r}; allowed: an even int >= 2 "
                             f"(the int4 kernels take {', '.join(map(str, INT4_KERNEL_GROUPS))}; "
                             "others use the pure-PyTorch path)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{owner}.symmetric={self.symmetric!r}; allowed: True or False")
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
            raise ValueError(f"{owner}.bits={self.bits!r}; allowed: 2, 3 or 4")


@dataclass
class SmoothQuantConfig:
    """SmoothQuant's migration strength: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (then quantize W8A8)."""

    alpha: float = 0.5  # 0: nothing moves into the weights; 1: the whole activation range does

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"{type(self).__name__}.alpha={self.alpha!r}; allowed: a number in [0, 1]")


_BUILT_IN = (Int8WeightOnlyConfig, Int8DynamicConfig, Int4WeightOnlyConfig, SmoothQuantConfig)
_SAVED_BEFORE_SUFFIX = {"Int8WeightOnly": "Int8WeightOnlyConfig", "Int8Dynamic": "Int8DynamicConfig",
                        "Int4WeightOnly": "Int4WeightOnlyConfig"}  # the "type" of files saved before the rename


def config_to_dict(config) -> dict:
    """Serialize a config dataclass to ``{"type": name, **fields}`` (plain JSON/YAML data: granularities as strings)."""
    fields = {k: v.value if isinstance(v, Granularity) else v for k, v in asdict(config).items()}
    return {"type": type(config).__name__, **fields}


def config_from_dict(d: dict):
    """Inverse of ``config_to_dict`` (also reads files saved before the rename, e.g. ``"Int4WeightOnly"``)."""
    d = dict(d)
    kind = d.pop("type")
    kind = _SAVED_BEFORE_SUFFIX.get(kind, kind)
    by_name = {c.__name__: c for c in (*_BUILT_IN, *config_types())}
    if kind not in by_name:
        raise ValueError(f"unknown quantization config {kind!r}; allowed: {', '.join(by_name)}")
    return by_name[kind](**d)
