"""The integer kernels quantized modules call, each with a pure-PyTorch fallback that the tests compare against.

* W8A8: the integer matmul ``torch._int_mm`` (the int8 recipe of LLM.int8() without its fp16
  outlier path, Dettmers et al., 2022, arXiv:2208.07339, and of ZeroQuant, Yao et al., 2022,
  arXiv:2206.01861); on the CPU, oneDNN's int8 linear (``onednn_int8_mm``) where it gives exactly
  ``_int_mm``'s result: it scales the int32 accumulator by the weight scales before it leaves the
  registers, so no (M, N) int32 tensor is written and walked again.
* Weight-only int8: ``aten._weight_int8pack_mm``.
* Dequantizing path (``int8_weight_only_mm``): the integer kernel or a float GEMM on the weight
  dequantized for the call, whichever ``dispatch`` measured faster on this CPU for the phase.
* Weight-only int4: ``int4_kernels``.

``use_kernels(False)`` forces every fallback.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["DEQUANT_PATHS", "INT8_PACK_MAX_ROWS", "W8A8_CHUNK_ELEMENTS", "int8_weight_only_backend",
           "int8_weight_only_mm", "int_mm", "int_mm_ok", "kernels_enabled", "onednn_int8_mm", "onednn_int8_pack",
           "quantize_activations", "use_kernels", "w8a8_int_mm_cpu", "w8a8_onednn"]

aten = torch.ops.aten

INT8_PACK_MAX_ROWS = 32  # int8_weight_only_mm(path=None): its kernel up to 32 rows, else bf16 (dispatch.FIXED_MIN_ROWS)
W8A8_CHUNK_ELEMENTS = 1 << 22  # int32 elements per W8A8 row chunk (16 MiB): one chunk at 8 x 256 tokens
DEQUANT_PATHS = {"dequant_bf16": torch.bfloat16, "dequant_fp32": torch.float32}  # float GEMM on dequantized weights

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


# ----------------------------------------------------------------------------- int8
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


def int8_weight_only_mm(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                        backend: str = "kernel", path: str | None = None) -> torch.Tensor:
    """``x @ (w_int8 * scales[:, None]).T`` for 2-D ``x`` (M, K), int8 ``w`` (N, K), fp32 ``scales`` (N,) -> (M, N).

    ``path``: 'kernel' (``aten._weight_int8pack_mm`` reads the int8 weight directly; bf16 out),
    'dequant_bf16' or 'dequant_fp32' (dequantize for this call, then the float GEMM; the output in
    that dtype). None: the fixed rule, kernel up to ``INT8_PACK_MAX_ROWS`` rows, else bf16 (the
    kernel is a per-row GEMV: 2.1 s vs 0.7 s for 2048 × 576 → 49152 on a Xeon). ``backend``
    'fallback' (the kernel cannot take this shape) never calls the kernel.
    """
    if path is None:
        path = "kernel" if x.shape[0] <= INT8_PACK_MAX_ROWS else "dequant_bf16"
    if path == "kernel" and backend == "kernel":
        try:
            return aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w_int8,
                                            scales.to(torch.bfloat16))  # (M, N) bf16
        except (RuntimeError, NotImplementedError):
            pass  # e.g. no CUDA implementation in this build: dequantize instead
    dtype = DEQUANT_PATHS.get(path, torch.bfloat16)
    return F.linear(x.to(dtype), w_int8.to(dtype) * scales.to(dtype)[:, None])  # (M, N)


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


# ----------------------------------------------------------------------------- W8A8 on oneDNN (CPU)
def onednn_int8_pack(weight_int8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pack an (N, K) int8 weight for ``onednn_int8_mm``; None when oneDNN cannot run it exactly here.

    The packed tensor is opaque (oneDNN's blocked layout, same bytes as the weight) and lives
    only in memory: checkpoints keep the plain int8 codes. Before it is used, the packed weight
    multiplies two probe rows and must give ``torch._int_mm``'s integers exactly: one row of
    ±127 with the signs of the weight's first row (the largest sums this weight can produce) and
    one of random codes. oneDNN's int8 GEMM on CPUs without VNNI adds 16-bit pair sums that can
    saturate; there, or when the op is missing, the caller keeps ``_int_mm``.
    """
    if not (kernels_enabled() and weight_int8.device.type == "cpu" and weight_int8.dtype == torch.int8
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return None
    n, k = weight_int8.shape
    gen = torch.Generator().manual_seed(0)
    probe = torch.stack([weight_int8[0].sign() * 127,
                         torch.randint(-127, 128, (k,), generator=gen, dtype=torch.int8)]).to(torch.int8)  # (2, K)
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight_int8, None)
        zero_points = torch.zeros(n, dtype=torch.int64)  # (N,) symmetric weights
        got = onednn_int8_mm(probe, (packed, zero_points), torch.ones(n))  # (2, N) float32, exact below 2^24
    except (RuntimeError, NotImplementedError):  # a build that lists the op but cannot run it
        return None
    want = torch._int_mm(probe, weight_int8.t()) if hasattr(torch, "_int_mm") else \
        (probe.double() @ weight_int8.t().double()).to(torch.int32)
    return (packed, zero_points) if torch.equal(got, want.float()) else None


def onednn_int8_mm(xq: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor],
                   col_scales: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 codes @ packed (N, K) int8 weight -> (M, N) float32 ``acc · col_scales``, in one oneDNN call.

    Bit-identical to ``torch._int_mm(xq, w.t()).float() * col_scales`` (the int32 sum is exact and
    the one fp32 multiply is the same); the int32 accumulator never reaches memory.
    """
    weight, zero_points = packed
    return torch.ops.onednn.qlinear_pointwise(xq.contiguous(), 1.0, 0, weight, col_scales, zero_points, None,
                                              1.0, 0, torch.float32, "none", [], "")  # (M, N)


# ----------------------------------------------------------------------------- W8A8 layer paths (CPU)
def quantize_activations(x2: torch.Tensor, smooth: torch.Tensor | None = None,
                         per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) and absmax scales (M, 1) (or (1, 1) per tensor); x / ``smooth`` (K,) first."""
    x2 = x2.float()
    if smooth is not None:
        x2 = x2 / smooth
    work = x2.abs()  # (M, K), reused below for x / scale: one temporary instead of two
    absmax = work.amax(-1, keepdim=True) if per_token else work.amax().reshape(1, 1)
    scale = absmax.clamp_min(1e-8) / 127  # (M, 1)
    grad = torch.is_grad_enabled() and (x2.requires_grad or scale.requires_grad)
    q = torch.div(x2, scale) if grad else torch.div(x2, scale, out=work)  # out= has no autograd
    return q.round_().to(torch.int8), scale


def w8a8_int_mm_cpu(x2: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor,
                    smooth: torch.Tensor | None = None, per_token: bool = True,
                    chunk_elements: int = W8A8_CHUNK_ELEMENTS) -> torch.Tensor:
    """CPU W8A8 (M, K) -> (M, N) fp32 on ``torch._int_mm`` without (M, N) temporaries, in row chunks; no bias.

    ``torch.mul(int32, fp32)`` first copies the whole accumulator to a new fp32 tensor (type
    promotion on the CPU), so a plain epilogue allocates and walks two (M, N) temporaries, and its
    cost depends on the allocator's state in each process. Here ``_int_mm`` writes each chunk's
    int32 result straight into the fp32 output's own memory, which is then converted and scaled in
    place: one (M, N) allocation in all, like the raw kernel's. Smaller chunks would keep the
    epilogue in L2 but multiply the ops, and on a busy CPU each op costs a scheduling delay
    (measured: 4 chunks ran 3x slower than the plain path under load 10). Bit-identical to
    ``_int_mm(q, w.t()) * scales * row_scales``.
    """
    m, n = x2.shape[0], weight_int8.shape[0]
    x2 = x2.float()
    out = torch.empty(m, n, dtype=torch.float32)  # (M, N)
    tensor_scale = None
    if not per_token:
        xs = x2 if smooth is None else x2 / smooth
        tensor_scale = xs.abs().amax().reshape(1, 1).clamp_min(1e-8) / 127  # (1, 1)
    chunks = -(-m // max(1, chunk_elements // n))
    rows = -(-m // chunks)  # even chunks: every op is a parallel region, which costs on a busy CPU
    wt = weight_int8.t()  # (K, N) view
    for i in range(0, m, rows):
        xc = x2[i:i + rows]  # (r, K)
        if smooth is not None:
            xc = xc / smooth
        sc = tensor_scale if tensor_scale is not None else \
            xc.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127  # (r, 1)
        q = torch.div(xc, sc).round_().to(torch.int8)  # (r, K)
        o = out[i:i + rows]  # (r, N) fp32, contiguous
        acc = torch._int_mm(q, wt, out=o.view(torch.int32))  # int32 written into o's bytes
        o.copy_(acc).mul_(scales).mul_(sc)  # in place: int32 -> fp32, weight scale, token scale
    return out


def w8a8_onednn(x2: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], scales: torch.Tensor,
                smooth: torch.Tensor | None = None, per_token: bool = True) -> torch.Tensor:
    """CPU W8A8 (M, K) -> (M, N) fp32 on oneDNN's int8 linear (weight scales applied in the kernel); no bias.

    Bit-identical to ``w8a8_int_mm_cpu`` where ``onednn_int8_pack`` accepted the weight.
    """
    xq, sx = quantize_activations(x2, smooth, per_token)
    return onednn_int8_mm(xq, packed, scales).mul_(sx)  # (M, N)
