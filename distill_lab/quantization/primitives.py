"""Numeric primitives of quantization: integer codes and scales of one tensor, and how far they are from it.

* Uniform affine quantization, symmetric (absmax) and asymmetric (min/max), per tensor, per
  channel or per group (Jacob et al., 2018, "Quantization and Training of Neural Networks for
  Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877; group-wise scales as in GGML's
  Q4_0/Q4_1 and in GPTQ/AWQ).
* ``Granularity``: how many values share one scale (the one vocabulary of the package).
* The clipping search of AWQ: shrink each group's range when that lowers its (weighted) rounding error.

* ``FakeQuantize``: quantize-dequantize with the straight-through estimator (QAT).

No model-level logic here: tensors in, tensors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

__all__ = ["MAX_BITS", "MIN_BITS", "SCALE_EPS", "FakeQuantize", "Granularity", "QuantizedTensor", "check_bits",
           "check_finite", "check_float_tensor", "clip_weight_", "dequantize", "fake_quantize", "quantization_error",
           "quantize_tensor", "search_clip_ratios", "shrink_clamp", "sqnr_db"]

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = torch.finfo(torch.float32).eps  # smallest quantization step (torchao's clamp for constant groups)


class Granularity(str, Enum):
    """How many values share one scale.

    ``PER_TENSOR``: one scale for the whole tensor; ``PER_CHANNEL``: one per output channel (row);
    ``PER_GROUP``: one per group of consecutive inputs; ``PER_TOKEN``: activations, one per token
    (row), computed at run time. Members are strings (``Granularity.PER_CHANNEL == "per_channel"``),
    and ``Granularity("per-channel")`` accepts the hyphenated spelling too.
    """

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # configs print as before: act_granularity='per_token'
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str):
            spelled = value.strip().lower().replace("-", "_").replace(" ", "_")
            for member in cls:
                if member.value == spelled:
                    return member
        return None

    @classmethod
    def parse(cls, value, name: str = "granularity", allowed: tuple | None = None) -> "Granularity":
        """``value`` as a member (a member or its string, '_' or '-'); else ValueError naming ``name`` and ``allowed``."""
        allowed = tuple(cls) if allowed is None else tuple(allowed)
        try:
            member = cls(value)
        except (TypeError, ValueError):
            member = None
        if member not in allowed:
            raise ValueError(f"{name}={value!r}; allowed: {', '.join(repr(m.value) for m in allowed)}")
        return member

    @property
    def axis(self) -> int | None:
        """The ``axis`` argument of ``quantize_tensor`` for a 2-D (out, in) weight: None per tensor, else -1."""
        return None if self is Granularity.PER_TENSOR else -1


# ----------------------------------------------------------------------------- tensors
@dataclass
class QuantizedTensor:
    """Integer codes plus the scales (and zero points) that map them back to real values.

    Symmetric: ``w ≈ codes * scale`` with ``codes`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int8).
    Asymmetric: ``w ≈ codes * scale + zero_point`` with ``codes`` in ``[0, 2^b - 1]`` (uint8), where
    the zero point is the real value of code 0 (the group minimum), as in GGML's Q4_1 and in
    PyTorch's int4 kernels ("float zero points").
    ``scales`` / ``zero_points`` have the input's shape with ``axis`` replaced by the number of
    groups (1 for per-channel); per-tensor gives shape ``[1] * ndim``.
    """

    codes: torch.Tensor  # integer codes, same shape as the quantized tensor
    scales: torch.Tensor  # step size per group (float32)
    zero_points: torch.Tensor | None  # real value of code 0 per group (asymmetric), else None
    bits: int  # bits per code, 2..8
    group_size: int | None  # elements per group along `axis`; None = the whole axis (per channel)
    symmetric: bool  # absmax (True) or min/max (False) grid
    axis: int | None  # dimension the groups run along; None = per tensor
    dtype: torch.dtype = torch.float32  # dtype of the original tensor

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def dequantize(self) -> torch.Tensor:
        """Return the real values the codes stand for (same shape and dtype as the original)."""
        return dequantize(self)

    def nbytes(self, packed: bool = True) -> int:
        """Bytes needed to store codes (``bits`` each when ``packed``) plus fp32 scales and zero points."""
        n = self.codes.numel()
        code_bytes = math.ceil(n * self.bits / 8) if packed else n * self.codes.element_size()
        extra = self.scales.numel() * 4 * (1 if self.zero_points is None else 2)
        return code_bytes + extra


def check_float_tensor(w, name: str = "w") -> None:
    """Raise ValueError unless ``w`` is a non-empty floating-point tensor."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"{name}.dtype={w.dtype}; allowed: a floating-point tensor")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); allowed: at least one element")


def check_finite(w: torch.Tensor, name: str = "w") -> None:
    """Raise ValueError when ``w`` holds NaN or Inf (they would spoil the scale of their whole group)."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}); "
                         f"allowed: finite weights only")


def check_bits(bits) -> None:
    """Raise ValueError unless ``bits`` is an int from ``MIN_BITS`` to ``MAX_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r}; allowed: an int from {MIN_BITS} to {MAX_BITS}")


def _grouped(w: torch.Tensor, group_size: int | None, axis: int | None):
    """Reshape ``w`` to (rows, n_groups, group) along ``axis``; return it and a function that undoes it."""
    if axis is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size} needs an axis; allowed with axis=None: "
                             "group_size=None (one scale for the whole tensor)")
        flat = w.reshape(1, 1, -1)  # (1, 1, N)
        shape = w.shape
        return flat, (lambda t: t.reshape(shape)), (lambda s: s.reshape([1] * len(shape)))
    if not isinstance(axis, int) or not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis={axis!r}; allowed: None or an int in [{-w.dim()}, {w.dim() - 1}]")
    axis = axis % w.dim()
    length = w.shape[axis]
    g = length if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or length % g:
        raise ValueError(f"group_size={group_size!r} does not divide dimension {axis} of size {length}; "
                         f"allowed: None or a positive divisor of {length}")
    moved = w.movedim(axis, -1)  # (..., L)
    lead = moved.shape[:-1]
    grouped = moved.reshape(-1, length // g, g)  # (R, G, g)

    def undo(t):  # (R, G, g) -> original layout
        return t.reshape(*lead, length).movedim(-1, axis)

    def undo_scales(s):  # (R, G, 1) -> shape of w with `axis` replaced by G
        return s.reshape(*lead, length // g).movedim(-1, axis)

    return grouped, undo, undo_scales


def quantize_tensor(w: torch.Tensor, bits: int = 8, group_size: int | None = None,
                    symmetric: bool = True, axis: int | None = -1) -> QuantizedTensor:
    """Round ``w`` onto a uniform ``bits``-bit grid per tensor (axis=None), per channel, or per group."""
    check_float_tensor(w)
    check_bits(bits)
    check_finite(w)
    grouped, undo, undo_scales = _grouped(w.detach().float(), group_size, axis)  # (R, G, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = grouped.abs().amax(-1, keepdim=True) / qmax  # (R, G, 1)
        scale = scale.clamp_min(SCALE_EPS)  # all-zero group: any step works
        codes = torch.round(grouped / scale).clamp_(-qmax, qmax).to(torch.int8)
        zero = None
    else:
        qmax = 2 ** bits - 1
        lo = grouped.amin(-1, keepdim=True)  # (R, G, 1)
        scale = (grouped.amax(-1, keepdim=True) - lo) / qmax
        # constant group (max == min): a tiny step, as torchao clamps it, so the zero point stays the value
        scale = scale.clamp_min(SCALE_EPS)
        codes = torch.round((grouped - lo) / scale).clamp_(0, qmax).to(torch.uint8)
        zero = undo_scales(lo)
    return QuantizedTensor(codes=undo(codes), scales=undo_scales(scale), zero_points=zero, bits=bits,
                           group_size=group_size, symmetric=symmetric, axis=axis, dtype=w.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Map a ``QuantizedTensor`` back to real values: ``codes * scale (+ zero_point)``."""
    codes, _, _ = _grouped(q.codes.float(), q.group_size, q.axis)  # (R, G, g)
    scales, _, _ = _grouped(q.scales.float(), None if q.axis is None else 1, q.axis)  # (R, G, 1)
    out = codes * scales
    if q.zero_points is not None:
        zeros, _, _ = _grouped(q.zero_points.float(), None if q.axis is None else 1, q.axis)
        out = out + zeros
    _, undo, _ = _grouped(q.codes, q.group_size, q.axis)
    return undo(out).to(q.dtype)


def fake_quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None,
                  symmetric: bool = True, axis: int | None = -1) -> torch.Tensor:
    """Quantize then dequantize (the rounding error, kept in float): ``dequantize(quantize_tensor(...))``.

    Computed in place on one float copy, without integer codes (it runs every QAT step and
    inside the AWQ/clipping searches); the values are the same as ``dequantize(quantize_tensor(...))``.
    """
    check_float_tensor(w)
    check_bits(bits)
    grouped, undo, _ = _grouped(w.detach().float(), group_size, axis)  # (R, G, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = grouped.abs().amax(-1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        out = torch.div(grouped, scale).round_().clamp_(-qmax, qmax).mul_(scale)
    else:
        qmax = 2 ** bits - 1
        lo = grouped.amin(-1, keepdim=True)
        scale = (grouped.amax(-1, keepdim=True) - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        out = torch.sub(grouped, lo).div_(scale).round_().clamp_(0, qmax).mul_(scale).add_(lo)
    return undo(out).to(w.dtype)


class FakeQuantize(nn.Module):
    """Quantize-dequantize in the forward pass, identity in the backward pass (the straight-through estimator).

    QAT's weight and activation fake-quantizers (a format's ``FormatSpec.weight_fake_quant``
    builds one with the format's rounding).
    """

    def __init__(self, bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                 axis: int | None = -1, dynamic_per_token: bool = False):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.axis = bits, group_size, symmetric, axis
        self.dynamic_per_token = dynamic_per_token  # activations: one absmax scale per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_per_token:
            scale = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / (2 ** (self.bits - 1) - 1)
            q = torch.round(x.detach() / scale) * scale
        else:
            q = fake_quantize(x.detach(), self.bits, self.group_size, self.symmetric, self.axis).to(x.dtype)
        return x + (q - x).detach()  # value of q, gradient of x

    def extra_repr(self) -> str:
        if self.dynamic_per_token:
            return f"int{self.bits} per-token dynamic"
        return f"int{self.bits} group={self.group_size} {'sym' if self.symmetric else 'asym'}"


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10·log10(Σw² / Σ(w - ŵ)²)`` (inf when exact)."""
    w, w_hat = w.double(), w_hat.double()
    noise = (w - w_hat).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def quantization_error(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """MSE, SQNR (dB) and max absolute error between a tensor and its quantized version."""
    diff = (w.double() - w_hat.double())
    return {"mse": diff.pow(2).mean().item(), "sqnr_db": sqnr_db(w, w_hat),
            "max_abs_error": diff.abs().max().item()}


# ----------------------------------------------------------------------------- clipping (AWQ, GPTQ)
def search_clip_ratios(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                       importance: torch.Tensor | None = None, ratios=None) -> torch.Tensor:
    """Per (row, group) of an (N, K) weight, the shrink ratio of its range that minimizes the rounding error.

    Shrinking the range clips the few largest weights but gives every other weight a finer
    grid. The error is ``Σ importance_k · (w - ŵ)²`` (``importance`` (K,) e.g. ``E[x_k²]`` of the
    Linear's input, so the error tracks the output error). Asymmetric ranges shrink around their
    midpoint, symmetric ones around 0. Returns (N, K/g) ratios.
    """
    check_float_tensor(w)
    check_bits(bits)
    ratios = torch.linspace(1.0, 0.5, 11) if ratios is None else torch.as_tensor(ratios, dtype=torch.float32)
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    imp = torch.ones(k) if importance is None else importance.detach().float().reshape(-1)
    imp = imp.to(wg.device).reshape(1, k // group_size, group_size)
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    best = torch.ones(wg.shape[:2], device=wg.device)
    for r in ratios.tolist():
        clipped = shrink_clamp(wg, r, symmetric)
        q = fake_quantize(clipped, bits, None, symmetric, -1)  # min/max grid of the clipped group
        err = ((q - wg).pow(2) * imp).sum(-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def shrink_clamp(wg: torch.Tensor, ratio, symmetric: bool) -> torch.Tensor:
    """Clamp each group (last dim) to its range shrunk by ``ratio`` (around 0, or around the midpoint)."""
    ratio = torch.as_tensor(ratio, dtype=wg.dtype, device=wg.device)
    if ratio.dim():
        ratio = ratio.unsqueeze(-1)
    if symmetric:
        a = wg.abs().amax(-1, keepdim=True) * ratio
        return torch.maximum(torch.minimum(wg, a), -a)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * ratio
    return torch.maximum(torch.minimum(wg, mid + half), mid - half)


@torch.no_grad()
def clip_weight_(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                 importance: torch.Tensor | None = None, ratios=None) -> torch.Tensor:
    """Clamp an (N, K) weight in place to the best clipped range per group (so min/max rounding then uses that grid).

    Returns the chosen (N, K/g) ratios. Applied before ``quantize_`` (round-to-nearest reads the
    clipped min/max) this is the clipping step of AWQ.
    """
    r = search_clip_ratios(weight, bits, group_size, symmetric, importance, ratios)
    n, k = weight.shape
    wg = weight.reshape(n, k // group_size, group_size)
    weight.copy_(shrink_clamp(wg.float(), r, symmetric).reshape(n, k).to(weight.dtype))
    return r
