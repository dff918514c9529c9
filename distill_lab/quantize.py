"""Quantization with real integer kernels: tensors, int8/int4 Linear modules, ``quantize_``, save/load, size.

What is implemented, and where it comes from:

* Uniform affine quantization, symmetric (absmax) and asymmetric (min/max), per tensor, per
  channel or per group (Jacob et al., 2018, "Quantization and Training of Neural Networks for
  Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877; group-wise scales as in GGML's
  Q4_0/Q4_1 and in GPTQ/AWQ).
* W8A8 with per-token dynamic activation scales and per-channel weight scales, the int8 recipe
  of LLM.int8() without its fp16 outlier path (Dettmers et al., 2022, arXiv:2208.07339) and of
  ZeroQuant (Yao et al., 2022, arXiv:2206.01861); the integer matmul is ``torch._int_mm``.
* Weight-only int8 (``aten._weight_int8pack_mm``) and weight-only int4 with group-wise scales
  and zeros (``aten._weight_int4pack_mm[_for_cpu]``, the "tinygemm" layout torchao uses).
* A torchao-style API: ``quantize_(model, config, filter_fn)`` swaps modules in place, and the
  configs are dataclasses (torchao: ``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``,
  ``Int4WeightOnlyConfig``).

SmoothQuant, AWQ and the outlier tools live in ``distill_lab.smoothquant``; QAT lives in
``distill_lab.qat``. Every kernel path has a pure-PyTorch fallback that the tests compare
against; ``use_kernels(False)`` forces it.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._fs import atomic_folder

aten = torch.ops.aten

MIN_BITS, MAX_BITS = 2, 8
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 kernels accept
FORMAT = "distill_lab.quantized/1"  # tag written into saved checkpoints
WEIGHTS_NAME = "model.safetensors"
QCONFIG_NAME = "quantization_config.json"


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


def _check_float_tensor(w, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"{name}.dtype={w.dtype}; allowed: a floating-point tensor")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); allowed: at least one element")


SCALE_EPS = torch.finfo(torch.float32).eps  # smallest quantization step (torchao's clamp for constant groups)


def _check_finite(w: torch.Tensor, name: str = "w") -> None:
    """Raise ValueError when ``w`` holds NaN or Inf (they would spoil the scale of their whole group)."""
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}); "
                         f"allowed: finite weights only")


def _check_bits(bits) -> None:
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
    _check_float_tensor(w)
    _check_bits(bits)
    _check_finite(w)
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


def search_clip_ratios(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                       importance: torch.Tensor | None = None, ratios=None) -> torch.Tensor:
    """Per (row, group) of an (N, K) weight, the shrink ratio of its range that minimizes the rounding error.

    Shrinking the range clips the few largest weights but gives every other weight a finer
    grid. The error is ``Σ importance_k · (w - ŵ)²`` (``importance`` (K,) e.g. ``E[x_k²]`` of the
    Linear's input, so the error tracks the output error). Asymmetric ranges shrink around their
    midpoint, symmetric ones around 0. Returns (N, K/g) ratios.
    """
    _check_float_tensor(w)
    _check_bits(bits)
    ratios = torch.linspace(1.0, 0.5, 11) if ratios is None else torch.as_tensor(ratios, dtype=torch.float32)
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    imp = torch.ones(k) if importance is None else importance.detach().float().reshape(-1)
    imp = imp.to(wg.device).reshape(1, k // group_size, group_size)
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    best = torch.ones(wg.shape[:2], device=wg.device)
    for r in ratios.tolist():
        clipped = _shrink_clamp(wg, r, symmetric)
        q = fake_quantize(clipped, bits, None, symmetric, -1)  # min/max grid of the clipped group
        err = ((q - wg).pow(2) * imp).sum(-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def _shrink_clamp(wg: torch.Tensor, ratio, symmetric: bool) -> torch.Tensor:
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
    weight.copy_(_shrink_clamp(wg.float(), r, symmetric).reshape(n, k).to(weight.dtype))
    return r


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
    _check_float_tensor(w)
    _check_bits(bits)
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


# ----------------------------------------------------------------------------- kernels
_KERNELS = {"enabled": True}


@contextlib.contextmanager
def use_kernels(enabled: bool = True):
    """Context manager: ``use_kernels(False)`` forces the pure-PyTorch fallbacks (for tests and comparisons)."""
    old = _KERNELS["enabled"]
    _KERNELS["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _KERNELS["enabled"] = old


def kernels_enabled() -> bool:
    """Return True unless inside ``use_kernels(False)``."""
    return _KERNELS["enabled"]


def int8_weight_only_backend(device: torch.device, in_features: int) -> str:
    """'kernel' when ``aten._weight_int8pack_mm`` accepts the shape on this device, else 'fallback'."""
    if not kernels_enabled() or not hasattr(aten, "_weight_int8pack_mm"):
        return "fallback"
    # measured here: the CPU kernel returns garbage or crashes unless K is a multiple of 16
    if device.type == "cpu" and in_features % 16 == 0:
        return "kernel"
    if device.type == "cuda" and in_features % 16 == 0:
        return "kernel"
    return "fallback"


W8A8_CHUNK_ELEMENTS = 1 << 22  # int32 elements per W8A8 row chunk (16 MiB): one chunk at 8 x 256 tokens; bounds the head
INT8_PACK_MAX_ROWS = 32  # measured here: the CPU kernel is a per-row GEMV; above ~32 rows bf16 GEMM wins


def int8_weight_only_mm(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                        backend: str = "kernel") -> torch.Tensor:
    """``x @ (w_int8 * scales[:, None]).T`` for 2-D ``x`` (M, K), int8 ``w`` (N, K), fp32 ``scales`` (N,) -> (M, N) bf16.

    Few rows (decode, memory-bound): ``aten._weight_int8pack_mm`` reads the int8 weight directly.
    Many rows (prefill, compute-bound): dequantize to bf16 once and use the bf16 GEMM, because the
    int8 kernel's time grows linearly with the rows (2.1 s vs 0.7 s for 2048 × 576 → 49152 here).
    """
    x = x.to(torch.bfloat16).contiguous()  # the fp32 CPU kernel is ~30x slower than bf16
    if backend == "kernel" and x.shape[0] <= INT8_PACK_MAX_ROWS:
        try:
            return aten._weight_int8pack_mm(x, w_int8, scales.to(torch.bfloat16))  # (M, N)
        except (RuntimeError, NotImplementedError):
            pass  # e.g. no CUDA implementation in this build: dequantize instead
    return F.linear(x, w_int8.to(torch.bfloat16) * scales.to(torch.bfloat16)[:, None])  # (M, N)


def int_mm_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    """True when ``torch._int_mm`` accepts (M, K) @ (K, N) on ``device`` (CUDA: M > 16, K and N multiples of 8)."""
    if not kernels_enabled() or not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0 and k > 0
    return device.type == "cpu"


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 × int8 → int32 matmul, (M, K) @ (K, N): ``torch._int_mm`` where it applies, else a float fallback.

    On CUDA, ``_int_mm`` needs M > 16: smaller M is padded with zero rows up to 32. Other
    shapes it refuses fall back to a float64 matmul, which is exact for int8 inputs (|sum| < 2^53).
    """
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cuda" and m <= 16 and int_mm_ok(32, k, n, a.device):
        padded = torch.zeros(32, k, dtype=a.dtype, device=a.device)
        padded[:m] = a
        return torch._int_mm(padded, b)[:m]
    if int_mm_ok(m, k, n, a.device):
        return torch._int_mm(a, b)  # (M, N) int32
    return (a.double() @ b.double()).to(torch.int32)  # exact fallback


def _int4_inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    return 0


def int4_layout_for(device: torch.device, out_features: int, in_features: int, group_size: int) -> str:
    """Which int4 layout serves this shape: 'cpu' / 'cuda' (PyTorch kernels) or 'plain' (pure-PyTorch fallback)."""
    if not kernels_enabled() or group_size not in INT4_KERNEL_GROUPS or in_features % group_size:
        return "plain"
    if device.type == "cpu" and hasattr(aten, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0:
        return "cpu"
    if (device.type == "cuda" and hasattr(aten, "_weight_int4pack_mm") and out_features % 8 == 0
            and _int4_inner_k_tiles(in_features) and torch.cuda.get_device_capability(device)[0] >= 8):
        return "cuda"
    return "plain"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack (N, K) codes in [0, 15] two per byte: (N, K/2) uint8, even k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be even to pack two codes per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # (N, K/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: (N, K/2) uint8 -> (N, K) uint8 codes in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)  # (N, K)


def _to_kernel_layout(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> the tensor the int4 kernel of ``layout`` expects."""
    if layout == "plain":
        return pack_int4(codes)
    if layout == "cpu":
        return aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    if layout == "cuda":  # tinygemm: (N, K/2) uint8 with the even k in the high nibble, then tiled
        c = codes.to(torch.uint8)
        packed = ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()
        return aten._convert_weight_to_int4pack(packed, _int4_inner_k_tiles(codes.shape[1]))
    raise ValueError(f"layout={layout!r}; allowed: 'plain', 'cpu', 'cuda'")


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
            layout: str) -> torch.Tensor:
    """(M, K) @ int4 weight (N, K) -> (M, N) bf16, with ``w = (q - 8)·scale + zero`` per group."""
    x = x.to(torch.bfloat16).contiguous()
    if layout == "cpu":
        return aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    if layout == "cuda":
        return aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return F.linear(x, _dequantize_int4(unpack_int4(packed), group_size, scales_and_zeros,
                                        torch.bfloat16))


def _dequantize_int4(codes: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """(N, K) codes and (K/g, N, 2) scales/zeros -> (N, K) weights, ``(q - 8)·scale + zero``."""
    n, k = codes.shape
    sz = scales_and_zeros.float()
    scale = sz[..., 0].t().unsqueeze(-1)  # (N, K/g, 1)
    zero = sz[..., 1].t().unsqueeze(-1)  # (N, K/g, 1)
    w = (codes.float().reshape(n, k // group_size, group_size) - 8) * scale + zero  # (N, K/g, g)
    return w.reshape(n, k).to(dtype)


def _unpack_kernel_layout(packed: torch.Tensor, layout: str, out_features: int, in_features: int,
                          group_size: int) -> torch.Tensor:
    """Read (N, K) codes back from a kernel layout by asking the kernel itself.

    The CPU layout depends on the instruction set (AVX-512 vs AVX2) and the CUDA one is tiled,
    so instead of re-implementing them: multiply the identity by the packed weight with scale 1
    and zero 8, which returns ``q`` exactly (small integers are exact in bf16).
    """
    if layout == "plain":
        return unpack_int4(packed)
    groups = in_features // group_size
    unit = torch.zeros(groups, out_features, 2, dtype=torch.bfloat16, device=packed.device)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    eye = torch.eye(in_features, dtype=torch.bfloat16, device=packed.device)  # (K, K)
    fn = aten._weight_int4pack_mm_for_cpu if layout == "cpu" else aten._weight_int4pack_mm
    codes_t = fn(eye, packed, group_size, unit)  # (K, N) = q^T
    return codes_t.t().round().to(torch.uint8).contiguous()  # (N, K)


# ----------------------------------------------------------------------------- configs
def _check_choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")


def _check_embedding_bits(owner: str, value) -> None:
    if value not in (None, 8):
        raise ValueError(f"{owner}.embedding_bits={value!r}; allowed: None (keep the embedding and "
                         "tied head in float) or 8")


@dataclass
class Int8WeightOnly:
    """int8 weights (per output channel), bf16 activations: ``aten._weight_int8pack_mm``."""

    embedding_bits: int | None = 8  # 8: token embedding and (tied) head to int8 too; None: keep them in float

    def __post_init__(self):
        _check_embedding_bits("Int8WeightOnly", self.embedding_bits)


@dataclass
class Int8Dynamic:
    """W8A8: int8 weights (per channel) and int8 activations (dynamic scales), integer matmul ``torch._int_mm``."""

    act_granularity: str = "per_token"  # 'per_token' (one scale per row) or 'per_tensor' (one per call)
    weight_granularity: str = "per_channel"  # 'per_channel' (one scale per output row) or 'per_tensor'
    embedding_bits: int | None = 8  # 8: embedding to int8 and the (tied) head to int8 too; None: keep in float
    head: str = "weight_only"  # int8 head: 'weight_only' (bf16 activations, the usual choice) or 'w8a8'

    def __post_init__(self):
        _check_choice("Int8Dynamic", "act_granularity", self.act_granularity, ("per_token", "per_tensor"))
        _check_choice("Int8Dynamic", "head", self.head, ("weight_only", "w8a8"))
        _check_choice("Int8Dynamic", "weight_granularity", self.weight_granularity,
                      ("per_channel", "per_tensor"))
        _check_embedding_bits("Int8Dynamic", self.embedding_bits)


@dataclass
class Int4WeightOnly:
    """Group-wise int4 weights packed two per byte, bf16 activations: ``aten._weight_int4pack_mm[_for_cpu]``.

    ``bits`` below 4 (3 or 2) keeps the same 4-bit container and kernel with fewer levels used:
    a harder grid for experiments (QAT), not a smaller file.
    """

    group_size: int = 64  # weights per scale along the input dim; kernels take 32, 64, 128, 256
    symmetric: bool = False  # False: min/max grid with a zero per group; True: absmax grid, no zeros stored
    bits: int = 4  # levels actually used: 2**bits (2, 3 or 4)
    embedding_bits: int | None = 8  # 8: embedding and (tied) head to int8; None: keep them in float

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2 \
                or self.group_size % 2:
            raise ValueError(f"Int4WeightOnly.group_size={self.group_size!r}; allowed: an even int >= 2 "
                             f"(the int4 kernels take {', '.join(map(str, INT4_KERNEL_GROUPS))}; "
                             "others use the pure-PyTorch path)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"Int4WeightOnly.symmetric={self.symmetric!r}; allowed: True or False")
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
            raise ValueError(f"Int4WeightOnly.bits={self.bits!r}; allowed: 2, 3 or 4")
        _check_embedding_bits("Int4WeightOnly", self.embedding_bits)


CONFIGS = {c.__name__: c for c in (Int8WeightOnly, Int8Dynamic, Int4WeightOnly)}


def config_to_dict(config) -> dict:
    """Serialize a config dataclass to ``{"type": name, **fields}``."""
    return {"type": type(config).__name__, **asdict(config)}


def config_from_dict(d: dict):
    """Inverse of ``config_to_dict``."""
    d = dict(d)
    kind = d.pop("type")
    if kind not in CONFIGS:
        raise ValueError(f"unknown quantization config {kind!r}; allowed: {', '.join(CONFIGS)}")
    return CONFIGS[kind](**d)


# ----------------------------------------------------------------------------- modules
class QuantizedModule(nn.Module):
    """Base class: a module whose weights live in integer buffers; reports its real storage bytes."""

    kind = "quantized"

    def storage_bytes(self) -> int:
        """Bytes of this module's own buffers (what it really holds in memory)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def logical_numel(self) -> int:
        """Number of weights it stands for (to compare with fp32)."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Device-independent tensors to save (packed codes in the portable layout)."""
        return {name: b for name, b in self.named_buffers(recurse=False)}

    def spec(self) -> dict:
        """JSON-serializable description needed to rebuild the module from ``export_tensors``."""
        raise NotImplementedError


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


class Int8WeightOnlyLinear(QuantizedModule):
    """Linear with int8 weights (N, K) and per-output-channel fp32 scales; bf16 activations."""

    kind = "int8_weight_only"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scales", scales.float().reshape(-1))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # (N,)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        """Quantize an ``nn.Linear`` per output channel (symmetric absmax, 8 bits)."""
        q = quantize_tensor(linear.weight, 8, None, True, -1)
        return cls(q.codes, q.scales.reshape(-1), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # (M, K)
        backend = int8_weight_only_backend(x.device, self.in_features)
        y = int8_weight_only_mm(x2, self.weight_int8, self.scales, backend).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight the module computes with."""
        return self.weight_int8.float() * self.scales[:, None]

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8DynamicLinear(QuantizedModule):
    """W8A8 Linear: activations quantized per token (or per tensor) at run time, ``torch._int_mm`` in int32.

    An optional ``smooth`` vector (K,) divides the input before quantization (SmoothQuant when
    the factor cannot be folded into the previous layer).
    """

    kind = "int8_dynamic"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 act_granularity: str = "per_token", smooth: torch.Tensor | None = None):
        super().__init__()
        _check_choice("Int8DynamicLinear", "act_granularity", act_granularity, ("per_token", "per_tensor"))
        self.out_features, self.in_features = weight_int8.shape
        self.act_granularity = act_granularity
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scales", scales.float().reshape(-1).expand(self.out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())  # (K,)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_granularity: str = "per_token",
                   weight_granularity: str = "per_channel") -> "Int8DynamicLinear":
        """Quantize an ``nn.Linear``'s weight to int8 (per channel or per tensor, symmetric)."""
        axis = -1 if weight_granularity == "per_channel" else None
        q = quantize_tensor(linear.weight, 8, None, True, axis)
        return cls(q.codes, q.scales.reshape(-1), linear.bias, act_granularity)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) float -> int8 codes (M, K) and scales (M, 1) (or (1, 1) per tensor)."""
        x2 = x2.float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        absmax = x2.abs().amax(-1, keepdim=True) if self.act_granularity == "per_token" \
            else x2.abs().amax().reshape(1, 1)
        scale = absmax.clamp_min(1e-8) / 127  # (M, 1)
        return torch.round(x2 / scale).to(torch.int8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # (M, K)
        if (x2.device.type == "cpu" and x2.shape[0] and int_mm_ok(*x2.shape, self.out_features, x2.device)
                and not (torch.is_grad_enabled() and x2.requires_grad)):
            y = self._forward_cpu_chunked(x2)  # same numbers, without the int32 -> fp32 temporaries
        else:
            xq, sx = self.quantize_input(x2)
            acc = int_mm(xq, self.weight_int8.t())  # (M, N) int32; the transposed view is what CUDA wants
            y = torch.mul(acc, self.scales).mul_(sx)  # (M, N) float32
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _forward_cpu_chunked(self, x2: torch.Tensor) -> torch.Tensor:
        """CPU W8A8 without (M, N) temporaries, in row chunks for very wide layers; bit-identical to the plain path.

        ``torch.mul(int32, fp32)`` first copies the whole accumulator to a new fp32 tensor (type
        promotion on the CPU), so the plain epilogue allocated and walked two (M, N) temporaries,
        and its cost depended on the allocator's state in each process. Here ``_int_mm`` writes
        each chunk's int32 result straight into the fp32 output's own memory, which is then
        converted and scaled in place: one (M, N) allocation in all, like the raw kernel's. Smaller
        chunks would keep the epilogue in L2 but multiply the ops, and on a busy CPU each op costs a
        scheduling delay (measured: 4 chunks ran 3x slower than the plain path under load 10).
        """
        m, n = x2.shape[0], self.out_features
        x2 = x2.float()
        out = torch.empty(m, n, dtype=torch.float32)  # (M, N)
        tensor_scale = None
        if self.act_granularity == "per_tensor":
            xs = x2 if self.smooth is None else x2 / self.smooth
            tensor_scale = xs.abs().amax().reshape(1, 1).clamp_min(1e-8) / 127  # (1, 1)
        chunks = -(-m // max(1, W8A8_CHUNK_ELEMENTS // n))
        rows = -(-m // chunks)  # even chunks: every op is a parallel region, which costs on a busy CPU
        wt = self.weight_int8.t()  # (K, N) view
        for i in range(0, m, rows):
            xc = x2[i:i + rows]  # (r, K)
            if self.smooth is not None:
                xc = xc / self.smooth
            sc = tensor_scale if tensor_scale is not None else \
                xc.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127  # (r, 1)
            q = torch.div(xc, sc).round_().to(torch.int8)  # (r, K)
            o = out[i:i + rows]  # (r, N) fp32, contiguous
            acc = torch._int_mm(q, wt, out=o.view(torch.int32))  # int32 written into o's bytes
            o.copy_(acc).mul_(self.scales).mul_(sc)  # in place: int32 -> fp32, weight scale, token scale
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight (before activation quantization)."""
        w = self.weight_int8.float() * self.scales[:, None]
        return w if self.smooth is None else w * self.smooth

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "act_granularity": self.act_granularity, "smooth": self.smooth is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"W8A8 {self.act_granularity} activations")


class Int4WeightOnlyLinear(QuantizedModule):
    """Linear with group-wise 4-bit weights, two codes per byte, bf16 group scales and zeros.

    The kernel convention is ``w = (q - 8)·scale + zero`` with ``q`` in [0, 15] (tinygemm). The
    packed tensor is in the layout of the kernel that runs it: ``'cpu'``
    (``_weight_int4pack_mm_for_cpu``), ``'cuda'`` (``_weight_int4pack_mm``) or ``'plain'``
    (the pure-PyTorch fallback: unpack, dequantize, matmul). All three hold ``in·out/2`` bytes.
    """

    kind = "int4_weight_only"

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, bits: int = 4, symmetric: bool = False,
                 layout: str | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size, self.bits, self.symmetric = group_size, bits, symmetric
        self.layout = layout or int4_layout_for(codes.device, self.out_features, self.in_features,
                                                group_size)
        self.register_buffer("packed", _to_kernel_layout(codes, self.layout))  # in·out/2 bytes
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())  # (K/g, N, 2)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4,
                   symmetric: bool = False) -> "Int4WeightOnlyLinear":
        """Quantize an ``nn.Linear`` group-wise along its input dimension."""
        codes, sz = int4_codes_and_scales(linear.weight, group_size, bits, symmetric)
        return cls(codes, sz, group_size, linear.bias, bits, symmetric)

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes in [0, 15], read back from the packed layout."""
        return _unpack_kernel_layout(self.packed, self.layout, self.out_features, self.in_features,
                                     self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float weight the kernel computes with (bf16 scales and zeros applied in fp32)."""
        return _dequantize_int4(self.codes(), self.group_size, self.scales_and_zeros, torch.float32)

    def repack(self, device: torch.device | str | None = None, layout: str | None = None) -> "Int4WeightOnlyLinear":
        """Move to ``device`` and re-pack for its kernel (or for ``layout``, e.g. 'plain' for the fallback)."""
        device = torch.device(device) if device is not None else self.packed.device
        codes = self.codes().to(device)
        self.layout = layout or int4_layout_for(device, self.out_features, self.in_features, self.group_size)
        self.packed = _to_kernel_layout(codes, self.layout)
        self.scales_and_zeros = self.scales_and_zeros.to(device)
        if self.bias is not None:
            self.bias = self.bias.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "plain" and self.packed.device.type != self.layout:
            self._repack_in_place()  # moved with .to(device): the layouts differ between devices
        x2, lead = _flatten(x)  # (M, K)
        y = int4_mm(x2, self.packed, self.group_size, self.scales_and_zeros, self.layout).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _repack_in_place(self) -> None:
        """Re-pack a kernel layout that was moved to another device (read back on its home device)."""
        device = self.packed.device
        home = torch.device("cpu") if self.layout == "cpu" else torch.device("cuda")
        codes = _unpack_kernel_layout(self.packed.to(home), self.layout, self.out_features,
                                      self.in_features, self.group_size).to(device)
        self.layout = int4_layout_for(device, self.out_features, self.in_features, self.group_size)
        self.packed = _to_kernel_layout(codes, self.layout)

    def logical_numel(self) -> int:
        return self.out_features * self.in_features

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": pack_int4(self.codes()).cpu()}  # portable layout: (N, K/2), even k low nibble
        sz = self.scales_and_zeros.cpu()
        if self.symmetric:  # zeros are all 0: store scales only
            out["scales"] = sz[..., 0].contiguous()
        else:
            out["scales_and_zeros"] = sz
        if self.bias is not None:
            out["bias"] = self.bias.cpu()
        return out

    @classmethod
    def from_exported(cls, tensors: dict, spec: dict, device) -> "Int4WeightOnlyLinear":
        """Rebuild from ``export_tensors`` output and ``spec`` on ``device``."""
        codes = unpack_int4(tensors["packed"]).to(device)
        if "scales" in tensors:
            s = tensors["scales"]
            sz = torch.stack([s, torch.zeros_like(s)], dim=-1)
        else:
            sz = tensors["scales_and_zeros"]
        bias = tensors.get("bias")
        return cls(codes, sz.to(device), spec["group_size"], None if bias is None else bias.to(device),
                   spec["bits"], spec["symmetric"])

    def spec(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "bits": self.bits, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} g{self.group_size} {'sym' if self.symmetric else 'asym'}, layout={self.layout}")


def int4_codes_and_scales(weight: torch.Tensor, group_size: int, bits: int = 4,
                          symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an (N, K) weight group-wise; return kernel codes (N, K) in [0, 15] and (K/g, N, 2) scales/zeros.

    The kernel computes ``(q - 8)·scale + zero``. Symmetric codes ``c`` in [-(2^(b-1)-1), 2^(b-1)-1]
    become ``q = c + 8`` with zero 0; asymmetric codes ``c`` in [0, 2^b - 1] (``c·s + min``) keep
    ``q = c`` with zero ``min + 8·s``.
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"bits={bits!r}; allowed: 2, 3 or 4 (the int4 container)")
    return int4_kernel_codes(quantize_tensor(weight, bits, group_size, symmetric, axis=-1))


def int4_kernel_codes(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a group-wise ``QuantizedTensor`` into the kernel's codes (N, K) in [0, 15] and (K/g, N, 2) scales/zeros."""
    scale = q.scales.float()  # (N, K/g)
    if q.symmetric:
        codes = (q.codes.to(torch.int16) + 8).to(torch.uint8)
        zero = torch.zeros_like(scale)
    else:
        codes = q.codes
        zero = q.zero_points.float() + 8 * scale
        const = scale <= SCALE_EPS  # (N, K/g) constant groups: their value must survive the bf16 zero point
        if bool(const.any()):
            codes, scale, zero = _exact_constant_groups(codes, scale, q.zero_points.float(), const)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
    return codes, sz


def _exact_constant_groups(codes, scale, value, const):
    """Constant groups: zero = bf16(value) and one code step carries what bf16 rounded away (|error| << 1e-3·|value|)."""
    z = value.to(torch.bfloat16).float()  # (N, G)
    r = value - z  # what the bf16 zero point loses
    step = torch.where(r > 0, r / 7, torch.where(r < 0, -r / 8, torch.zeros_like(r))).clamp_min(SCALE_EPS)
    code = torch.where(r > 0, 15, torch.where(r < 0, 0, 8)).to(codes.dtype)  # (q - 8)·step = r
    n, k = codes.shape
    grouped = codes.clone().reshape(n, const.shape[1], -1)  # (N, G, g)
    grouped[const] = code[const].unsqueeze(-1).expand(-1, grouped.shape[-1])
    return grouped.reshape(n, k), torch.where(const, step, scale), torch.where(const, z, value + 8 * scale)


class Int8Embedding(QuantizedModule):
    """Token embedding with int8 rows and one fp32 scale per token (per-row absmax)."""

    kind = "int8_embedding"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, out_dtype=torch.float32,
                 embed_scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.out_dtype = out_dtype
        self.embed_scale = float(embed_scale)  # output factor of scaled embeddings (Gemma: sqrt(hidden))
        self.register_buffer("weight_int8", weight_int8)  # (V, D) int8
        self.register_buffer("scales", scales.float().reshape(-1))  # (V,)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        """Quantize each embedding row symmetrically to int8 (keeping the embedding's output scale, if any)."""
        from .arch import embedding_scale

        q = quantize_tensor(emb.weight, 8, None, True, -1)
        return cls(q.codes, q.scales.reshape(-1), emb.weight.dtype, embedding_scale(emb))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(self.out_dtype)  # (B, T, D)
        scales = self.scales[ids].unsqueeze(-1)  # (B, T, 1)
        if self.embed_scale != 1.0:
            scales = scales * self.embed_scale
        return rows * scales.to(self.out_dtype)

    def logical_numel(self) -> int:
        return self.weight_int8.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embed_scale": self.embed_scale,
                "embedding_dim": self.embedding_dim, "out_dtype": str(self.out_dtype).replace("torch.", "")}

    def extra_repr(self) -> str:
        scale = f", x{self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row{scale}"


# ----------------------------------------------------------------------------- quantize_
@dataclass
class QuantizationSummary:
    """What ``quantize_`` did: modules replaced per kind, modules left in float, and why."""

    config: dict  # the config as a dict
    replaced: dict = field(default_factory=dict)  # kind -> count
    float_modules: dict = field(default_factory=dict)  # module name -> reason it stayed in float
    tied_head: bool = False  # True when the head shares the embedding's int8 codes

    def count(self, kind: str) -> None:
        """Count one replaced module of ``kind``."""
        self.replaced[kind] = self.replaced.get(kind, 0) + 1

    def __repr__(self) -> str:
        kinds = ", ".join(f"{v}× {k}" for k, v in self.replaced.items()) or "nothing"
        floats = "; ".join(f"{k} ({v})" for k, v in self.float_modules.items()) or "none"
        return f"QuantizationSummary({self.config['type']}: {kinds}; kept in float: {floats})"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear_from_config(linear: nn.Linear, config) -> QuantizedModule | None:
    if isinstance(config, Int8WeightOnly):
        return Int8WeightOnlyLinear.from_float(linear)
    if isinstance(config, Int8Dynamic):
        return Int8DynamicLinear.from_float(linear, config.act_granularity, config.weight_granularity)
    if isinstance(config, Int4WeightOnly):
        if linear.in_features % config.group_size:
            return None
        return Int4WeightOnlyLinear.from_float(linear, config.group_size, config.bits, config.symmetric)
    raise ValueError(f"config={config!r}; allowed: {', '.join(CONFIGS)}")


def _head_module(weight_int8: torch.Tensor, scales: torch.Tensor, config, bias=None) -> QuantizedModule:
    """The int8 output head for a config (shares the embedding's tensors when tied)."""
    if isinstance(config, Int8Dynamic) and config.head == "w8a8":
        return Int8DynamicLinear(weight_int8, scales, bias, config.act_granularity)
    return Int8WeightOnlyLinear(weight_int8, scales, bias)


def _embedding_and_head(model: nn.Module):
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    return emb, head


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, m in model.named_modules():
        if m is target:
            return name
    return None


def quantize_(model: nn.Module, config, filter_fn=None) -> QuantizationSummary:
    """Replace the model's ``nn.Linear`` (and, per config, embedding and head) with real quantized modules, in place.

    ``filter_fn(module, name) -> bool`` picks which Linear layers to quantize (default: all but
    the output head, which follows ``config.embedding_bits``). Returns a summary that says what
    stayed in float.
    """
    if not isinstance(config, tuple(CONFIGS.values())):
        raise ValueError(f"config={config!r}; allowed: an instance of {', '.join(CONFIGS)}")
    from .arch import check_linear_layout

    check_linear_layout(model, "quantize_")  # Conv1D / 3-D expert weights would be skipped silently
    for name, module in model.named_modules():  # refuse NaN/Inf before anything is replaced
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _check_finite(module.weight.detach(), f"{name}.weight" if name else "weight")
    if isinstance(config, Int4WeightOnly):
        head = _embedding_and_head(model)[1]
        eligible = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
                    and (filter_fn is None or filter_fn(m, n))]
        if eligible and all(m.in_features % config.group_size for _, m in eligible):
            widths = sorted({m.in_features for _, m in eligible})
            raise ValueError(f"Int4WeightOnly.group_size={config.group_size} divides none of the "
                             f"{len(eligible)} layers' input widths {widths}; allowed: a divisor of one of them")
    summary = QuantizationSummary(config=config_to_dict(config))
    head_name = quantize_embedding_and_head_(model, config, summary)

    # 2. every other Linear
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == head_name:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            summary.float_modules[name] = "filter_fn"
            continue
        qmod = _linear_from_config(module, config)
        if qmod is None:
            summary.float_modules[name] = (f"in_features={module.in_features} not divisible by "
                                           f"group_size={config.group_size}")
            continue
        _set_module(model, name, qmod)
        summary.count(qmod.kind)
    model.quantization_config = config_to_dict(config)  # read by save_quantized
    return summary


def quantize_embedding_and_head_(model: nn.Module, config, summary: QuantizationSummary | None = None) -> str | None:
    """Quantize the token embedding to int8 and the output head with it (shared codes when tied), per ``config.embedding_bits``.

    Returns the head's module name (so callers can skip it). The tied 49k × 576 head is the
    largest single matmul of a decode step, so leaving it in float caps the speed-up.
    """
    summary = summary if summary is not None else QuantizationSummary(config=config_to_dict(config))
    emb, head = _embedding_and_head(model)
    emb_name, head_name = _module_name(model, emb), _module_name(model, head)
    if config.embedding_bits == 8 and isinstance(emb, nn.Embedding):
        tied = isinstance(head, nn.Linear) and head.weight is emb.weight
        qemb = Int8Embedding.from_float(emb)
        _set_module(model, emb_name, qemb)
        summary.count(qemb.kind)
        if tied:
            qhead = _head_module(qemb.weight_int8, qemb.scales, config)  # same tensors: stored once
            _set_module(model, head_name, qhead)
            summary.tied_head = True
            summary.count(qhead.kind)
        elif isinstance(head, nn.Linear):
            q = quantize_tensor(head.weight, 8, None, True, -1)
            qhead = _head_module(q.codes, q.scales.reshape(-1), config, head.bias)
            _set_module(model, head_name, qhead)
            summary.count(qhead.kind)
    else:
        if emb_name is not None and isinstance(emb, nn.Embedding):
            summary.float_modules[emb_name] = "embedding_bits=None"
        if head_name is not None and isinstance(head, nn.Linear):
            summary.float_modules[head_name] = "output head follows embedding_bits=None"
    return head_name


# ----------------------------------------------------------------------------- sizes, save, load
def _unique_tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            yield t


def memory_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters and buffers (tied or shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def fp32_equivalent_bytes(model: nn.Module) -> int:
    """What the model's weights would take in fp32 (quantized modules counted by the weights they stand for)."""
    total, seen = 0, set()
    quantized = set()  # storages owned by quantized modules
    for m in model.modules():
        if not isinstance(m, QuantizedModule):
            continue
        storages = {b.untyped_storage().data_ptr() for b in m.buffers(recurse=False)}
        main = next(iter(m.buffers(recurse=False))).untyped_storage().data_ptr()  # codes
        quantized |= storages
        if main in seen:  # a tied head that shares the embedding's codes
            continue
        seen.add(main)
        bias = getattr(m, "bias", None)
        total += 4 * (m.logical_numel() + (0 if bias is None else bias.numel()))
    for t in _unique_tensors(model):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in quantized:
            total += 4 * t.numel()
    return total


def _persistent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without quantized modules' buffers and without non-persistent buffers."""
    qnames = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    state = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(q + ".") for q in qnames):
            continue
        state[k] = v
    return state


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Save a (quantized or float) HF model as one safetensors file of packed tensors plus its configs; atomic."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, modules, owners = {}, {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedModule):
            continue
        spec = m.spec()
        shared = [owners.get(b.untyped_storage().data_ptr()) for b in m.buffers(recurse=False)
                  if b.numel() > 1]
        shared = [s for s in shared if s is not None]
        if shared and m.kind in ("int8_weight_only", "int8_dynamic"):
            spec["tied_to"] = shared[0]  # shares the embedding's codes and scales
            modules[name] = spec
            continue
        for b in m.buffers(recurse=False):
            owners.setdefault(b.untyped_storage().data_ptr(), name)
        for k, v in m.export_tensors().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
        modules[name] = spec
    seen = {}
    for k, v in _persistent_state(model).items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel())
        if key in seen:  # tied float weights: saved once
            continue
        seen[key] = k
        tensors[k] = v.detach().cpu().contiguous()
    qconfig = {"format": FORMAT, "config": getattr(model, "quantization_config", None), "modules": modules,
               "tied_float": {}}
    meta = {"distill_lab": json.dumps(qconfig)}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / QCONFIG_NAME).write_text(json.dumps(qconfig, indent=2))
        if hasattr(model, "config"):
            model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder / WEIGHTS_NAME


def saved_size_bytes(model: nn.Module) -> int:
    """Size on disk of the safetensors file ``save_quantized`` writes for this model."""
    with tempfile.TemporaryDirectory() as tmp:
        return (save_quantized(model, Path(tmp) / "m")).stat().st_size


def _rebuild(spec: dict, tensors: dict, device) -> QuantizedModule:
    kind = spec["kind"]
    t = {k: v.to(device) for k, v in tensors.items()}
    if kind == "int8_embedding":
        return Int8Embedding(t["weight_int8"], t["scales"], getattr(torch, spec.get("out_dtype", "float32")),
                             spec.get("embed_scale", 1.0))
    if kind == "int8_weight_only":
        return Int8WeightOnlyLinear(t["weight_int8"], t["scales"], t.get("bias"))
    if kind == "int8_dynamic":
        return Int8DynamicLinear(t["weight_int8"], t["scales"], t.get("bias"), spec["act_granularity"],
                                 t.get("smooth"))
    if kind == "int4_weight_only":
        return Int4WeightOnlyLinear.from_exported(tensors, spec, device)
    raise ValueError(f"unknown quantized module kind {kind!r} in checkpoint")


def load_quantized(folder: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by ``save_quantized``: float parts, then the packed modules, re-packed for ``device``."""
    from ._folder import check_model_folder
    from .profiles import default_device

    folder = Path(folder)
    device = torch.device(device) if device is not None else default_device()
    check_model_folder(folder)  # checksums, headers, config sizes: before anything is allocated
    try:
        return _load_quantized(folder, device)
    except (KeyError, AttributeError, TypeError, IndexError, json.JSONDecodeError) as err:  # a bad module spec
        raise ValueError(f"quantized model folder {str(folder)!r} is damaged or from another version: "
                         f"{type(err).__name__} {' '.join(str(err).split())[:160]}") from None


def _load_quantized(folder: Path, device: torch.device) -> nn.Module:
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / QCONFIG_NAME).is_file():
        raise ValueError(f"quantized model folder {str(folder)!r} is incomplete: {QCONFIG_NAME} is missing")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
        if "distill_lab" not in meta:
            raise ValueError(f"{folder / WEIGHTS_NAME} was not written by save_quantized (no distill_lab metadata)")
        qconfig = json.loads(meta["distill_lab"])
        # clone: safetensors may hand back views at unaligned offsets of the file, and the int8
        # CPU kernel (aten._weight_int8pack_mm) crashes on an unaligned weight
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    modules = qconfig["modules"]
    built = {}
    for name, spec in modules.items():
        if "tied_to" in spec:
            continue
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        built[name] = _rebuild(spec, own, device)
        _set_module(model, name, built[name])
    for name, spec in modules.items():
        if "tied_to" in spec:
            src = built[spec["tied_to"]]
            head = Int8DynamicLinear(src.weight_int8, src.scales, None, spec["act_granularity"]) \
                if spec["kind"] == "int8_dynamic" else Int8WeightOnlyLinear(src.weight_int8, src.scales)
            _set_module(model, name, head)
    float_state = {k: v for k, v in tensors.items()
                   if not any(k.startswith(n + ".") for n in modules)}
    missing, unexpected = model.load_state_dict(float_state, strict=False, assign=True)
    qnames = tuple(n + "." for n in modules)
    missing = [k for k in missing if not k.startswith(qnames)]
    emb, head = _embedding_and_head(model)
    if getattr(config, "tie_word_embeddings", False) and isinstance(emb, nn.Embedding) \
            and isinstance(head, nn.Linear):  # float tied weights were saved once
        head.weight = emb.weight
        missing = [k for k in missing if k != f"{_module_name(model, head)}.weight"]
    if missing or unexpected:
        raise ValueError(f"quantized model folder {str(folder)!r} does not match its config: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    model.quantization_config = qconfig["config"]
    return model.to(device).eval()


def compression_report(model: nn.Module, fp32_bytes: int | None = None, on_disk: bool = True) -> dict:
    """Measured size of a model in memory and on disk, its ratio to fp32 and the memory saved.

    ``fp32_bytes`` defaults to the fp32 size of the weights the model stands for; the disk size
    is the safetensors file ``save_quantized`` writes (measured, not estimated).
    """
    mem = memory_bytes(model)
    ref = fp32_equivalent_bytes(model) if fp32_bytes is None else int(fp32_bytes)
    report = {"memory_bytes": mem, "fp32_bytes": ref, "ratio_memory": ref / mem,
              "memory_saved_bytes": ref - mem}
    if on_disk:
        disk = saved_size_bytes(model)
        report.update(disk_bytes=disk, ratio_disk=ref / disk)
    kinds, floats = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            floats.append(name)
    report["quantized_modules"] = kinds
    report["float_modules"] = floats
    return report


# ----------------------------------------------------------------------------- the knobs panel
GRANULARITIES = ("per-tensor", "per-channel", 32, 64, 128)


def quantization_view(w: torch.Tensor, bits: int = 4, granularity="per-channel", symmetric: bool = True,
                      max_errors: int = 200_000) -> dict:
    """Quantize a 2-D weight and return what the knobs panel draws: one group with its grid, errors, SQNR.

    ``granularity`` is 'per-tensor', 'per-channel' or a group size along the input dimension.
    The group shown is the one holding the largest |w| (the hardest one for its grid).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out, in), got shape {tuple(w.shape)}")
    if granularity == "per-tensor":
        group_size, axis = None, None
    elif granularity == "per-channel":
        group_size, axis = None, -1
    else:
        group_size, axis = int(granularity), -1
    q = quantize_tensor(w, bits, group_size, symmetric, axis)
    w_hat = dequantize(q)
    err = (w_hat - w).float().flatten()
    row, col = divmod(int(w.abs().argmax()), w.shape[1])
    if axis is None:
        values, g, r = w.flatten(), 0, 0
    else:
        size = group_size or w.shape[1]
        g, r = col // size, row
        values = w[row, g * size:(g + 1) * size]
    scale = float(q.scales.reshape(-1)[0] if axis is None else q.scales[r, g])
    zero = 0.0 if q.zero_points is None else float(
        q.zero_points.reshape(-1)[0] if axis is None else q.zero_points[r, g])
    levels = torch.arange(q.qmin, q.qmax + 1, dtype=torch.float32) * scale + zero
    step = torch.linspace(0, err.numel() - 1, min(err.numel(), max_errors)).long()
    return {"bits": bits, "granularity": granularity, "symmetric": symmetric,
            "sqnr_db": sqnr_db(w, w_hat), "mse": float(err.pow(2).mean()), "group_values": values.detach().float(),
            "grid": levels, "errors": err[step], "scale": scale,
            "bytes_per_weight": q.nbytes() / w.numel()}


# ----------------------------------------------------------------------------- kernel timings
KERNEL_SHAPES = (("decode: 1×576 → 1536 (gate/up)", 1, 576, 1536),
                 ("prefill: 2048×576 → 1536", 2048, 576, 1536),
                 ("decode: 1×576 → 49152 (tied head)", 1, 576, 49152))


def _median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@torch.inference_mode()
def kernel_benchmark(shapes=KERNEL_SHAPES, repeats: int = 20, seed: int = 0) -> list[dict]:
    """Median milliseconds of one Linear at the teacher's shapes: fp32, bf16, int8 weight-only, W8A8, int4 g64 (CPU)."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for label, m, k, n in shapes:
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        x = torch.randn(m, k, generator=gen)
        xb = x.bfloat16()
        bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        bf16.weight.data.copy_(lin.weight.data)
        mods = {"fp32": (lin, x), "bf16": (bf16, xb),
                "int8 weight-only": (Int8WeightOnlyLinear.from_float(lin), x),
                "W8A8": (Int8DynamicLinear.from_float(lin), x),
                "int4 g64": (Int4WeightOnlyLinear.from_float(lin, 64), x)}
        reps = max(5, repeats // 4) if m > 16 else repeats
        ms = {name: 1e3 * _median_seconds(lambda mod=mod, inp=inp: mod(inp), reps) for name, (mod, inp) in mods.items()}
        rows.append({"shape": label, **ms})
    return rows


def format_kernel_table(rows: list[dict]) -> str:
    """Text table of ``kernel_benchmark`` rows: milliseconds and speed-up over fp32."""
    names = [k for k in rows[0] if k != "shape"]
    lines = [f"{'matmul':36s}" + "".join(f"{n:>20s}" for n in names)]
    for r in rows:
        lines.append(f"{r['shape']:36s}" + "".join(
            f"{r[n]:>11.3f} ms {r['fp32'] / r[n]:4.1f}×" for n in names))
    return "\n".join(lines)
