"""The integer kernels quantized modules call, each with a pure-PyTorch fallback that the tests compare against.

* W8A8: the integer matmul ``torch._int_mm`` (the int8 recipe of LLM.int8() without its fp16
  outlier path, Dettmers et al., 2022, arXiv:2208.07339, and of ZeroQuant, Yao et al., 2022,
  arXiv:2206.01861); on the CPU, oneDNN's int8 linear (``onednn_int8_mm``) where it gives exactly
  ``_int_mm``'s result: it scales the int32 accumulator by the weight scales before it leaves the
  registers, so no (M, N) int32 tensor is written and walked again.
* Weight-only int8: ``aten._weight_int8pack_mm``.
* Weight-only int4 with group-wise scales and zeros: ``aten._weight_int4pack_mm[_for_cpu]``, the
  "tinygemm" layout torchao uses, with its packing (``to_kernel_layout``) and a way back to the codes.
* Dequantizing paths (``int8_weight_only_mm``, ``int4_linear``): the integer kernel or a float GEMM on
  weights dequantized for the call, whichever ``dispatch`` measured faster on this CPU for the phase.
* Row reads of a packed int4 weight (``int4_row_positions``, ``gather_int4_rows``): an int4
  embedding looks up a few rows of the very tensor its tied head multiplies with.

``use_kernels(False)`` forces every fallback.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .primitives import SCALE_EPS, QuantizedTensor, quantize_tensor

__all__ = ["DEQUANT_PATHS", "INT4_KERNEL_GROUPS", "INT8_PACK_MAX_ROWS", "W8A8_CHUNK_ELEMENTS", "dequantize_int4",
           "gather_int4_rows", "int4_codes_and_scales", "int4_dequantize_packed", "int4_kernel_codes",
           "int4_layout_for", "int4_linear", "int4_mm", "int4_row_positions", "int8_weight_only_backend",
           "int8_weight_only_mm", "int_mm", "int_mm_ok", "kernels_enabled", "onednn_int8_mm", "onednn_int8_pack",
           "pack_int4", "quantize_activations", "to_kernel_layout", "unpack_int4", "unpack_kernel_layout",
           "use_kernels", "w8a8_int_mm_cpu", "w8a8_onednn"]

aten = torch.ops.aten

INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 kernels accept
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


# ----------------------------------------------------------------------------- int4
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


def to_kernel_layout(codes: torch.Tensor, layout: str) -> torch.Tensor:
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
    return F.linear(x, dequantize_int4(unpack_int4(packed), group_size, scales_and_zeros, torch.bfloat16))


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                layout: str, out_features: int, path: str = "kernel") -> torch.Tensor:
    """(M, K) @ int4 weight (N, K) -> (M, N): the int4 kernel (bf16 out), or for ``path`` 'dequant_bf16' /
    'dequant_fp32' a float GEMM on the weight dequantized for this call (output in that dtype).

    The dequantizing paths pay one pass over the (N, K) weight per call, which a prefill of many
    rows amortizes; on a CPU whose int4 kernel is slower than its float GEMM at many rows they win
    there (one 1024 x 576 -> 1536 Linear on an AMD EPYC: kernel 0.90x fp32, dequant_bf16 1.29x).
    """
    if path == "kernel" or layout == "plain":
        return int4_mm(x, packed, group_size, scales_and_zeros, layout)
    dtype = DEQUANT_PATHS[path]
    w = int4_dequantize_packed(packed, layout, group_size, scales_and_zeros, out_features, x.shape[-1], dtype)
    return F.linear(x.to(dtype), w)  # (M, N)


def dequantize_int4(codes: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """(N, K) codes and (K/g, N, 2) scales/zeros -> (N, K) weights, ``(q - 8)·scale + zero``."""
    n, k = codes.shape
    sz = scales_and_zeros.float()
    scale = sz[..., 0].t().unsqueeze(-1)  # (N, K/g, 1)
    zero = sz[..., 1].t().unsqueeze(-1)  # (N, K/g, 1)
    w = (codes.float().reshape(n, k // group_size, group_size) - 8) * scale + zero  # (N, K/g, g)
    return w.reshape(n, k).to(dtype)


def unpack_kernel_layout(packed: torch.Tensor, layout: str, out_features: int, in_features: int,
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


# ----------------------------------------------------------------------------- int4 rows
_PROBE_ROWS = (256, 128, 64, 32, 16, 8)  # rows packed to find a layout's block (the kernels need N % 8 or 16)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit halves of a packed tensor's bytes in memory order, low half first: (2·bytes,) uint8."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(-1)


def int4_row_positions(layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """Where the codes of a row sit in a packed int4 layout: (B, K) int64 nibble offsets in a block of B rows.

    Each layout is a run of equal blocks of B consecutive rows (B = 1 for 'plain'; 64 for the
    AVX-512 CPU kernel), B found by probing, not assumed. Code (n, k) is nibble ``(n // B)·B·K + pos[n % B, k]`` of
    the packed bytes (byte ``nibble // 2``, low half when even). Like ``unpack_kernel_layout``, this
    asks the kernel rather than re-implementing its layout (see ``_probe_positions``).
    """
    if layout == "plain":
        return torch.arange(in_features).reshape(1, in_features)
    # the whole weight when small (a last, partial block may be laid out differently), else a slice of blocks
    rows = out_features if out_features <= _PROBE_ROWS[0] else \
        next((r for r in _PROBE_ROWS if out_features % r == 0), None)
    if rows is None:
        raise ValueError(f"out_features={out_features} with layout={layout!r}; allowed: a multiple of 8")
    return _probe_positions(layout, rows, in_features)


@functools.lru_cache(maxsize=8)
def _probe_positions(layout: str, rows: int, k: int) -> torch.Tensor:
    """Pack ``rows`` probe rows whose codes spell their own index in base 16; read back where each landed.

    Returns the positions of the smallest block that repeats (B, K), on the CPU.
    """
    home = torch.device("cuda" if layout == "cuda" else "cpu")
    n = rows * k
    index = torch.arange(n, device=home).reshape(rows, k)
    stored = torch.zeros(n, dtype=torch.int64, device=home)  # nibble j -> index of the code stored there
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        nib = _nibbles(to_kernel_layout(((index >> shift) & 15).to(torch.uint8), layout))
        if nib.numel() != n:
            raise RuntimeError(f"the int4 {layout!r} layout holds {nib.numel()} codes for {n}")
        stored |= nib.long() << shift
    stored = stored.cpu()
    if not torch.equal(stored.sort().values, torch.arange(n)):
        raise RuntimeError(f"the int4 {layout!r} layout is not a reordering of the codes")
    pos = torch.empty(n, dtype=torch.int64)
    pos[stored] = torch.arange(n)
    pos = pos.reshape(rows, k)  # (R, K) nibble of code (r, k)
    for block in (b for b in range(1, rows + 1) if rows % b == 0):  # smallest B whose blocks all look alike
        tiles = pos.reshape(rows // block, block * k) - torch.arange(rows // block)[:, None] * (block * k)
        if bool((tiles == tiles[:1]).all()):
            return tiles[0].reshape(block, k).clone()  # (B, K)
    raise AssertionError("unreachable: one block of all the rows always repeats")


def gather_int4_rows(packed: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Codes (M, K) uint8 in [0, 15] of rows ``ids`` (M,) of a packed int4 weight, reading only those rows' bytes.

    ``positions`` (B, K) is ``int4_row_positions`` of the packed tensor's layout, on its device.
    """
    block, k = positions.shape
    nib = (ids // block).unsqueeze(-1) * (block * k) + positions[ids % block]  # (M, K) nibble offsets
    byte = packed.reshape(-1).view(torch.uint8)[nib >> 1]  # (M, K)
    return ((byte >> ((nib & 1) << 2)) & 0x0F).to(torch.uint8)


def int4_dequantize_packed(packed: torch.Tensor, layout: str, group_size: int, scales_and_zeros: torch.Tensor,
                           out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weights ``(q - 8)·scale + zero`` in ``dtype`` straight from a packed layout: one gather of nibbles.

    Exactly ``dequantize_int4(unpack_kernel_layout(...))`` in fp32 (the bf16 scales and zeros are
    exact in fp32), without the identity matmul: the codes are read at ``int4_row_positions``.
    """
    pos = _flat_positions(layout, out_features, in_features)  # (B·K,) nibble offsets inside a block of B rows
    codes = _nibbles(packed).reshape(-1, pos.numel()).index_select(1, pos)  # (N/B, B·K)
    n, k, g = out_features, in_features, group_size
    sz = scales_and_zeros.to(dtype)  # (K/g, N, 2)
    w = codes.reshape(n, k // g, g).to(dtype).sub_(8)  # (N, K/g, g)
    w.mul_(sz[..., 0].t().unsqueeze(-1)).add_(sz[..., 1].t().unsqueeze(-1))
    return w.reshape(n, k)


@functools.lru_cache(maxsize=64)
def _flat_positions(layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """``int4_row_positions`` flattened (B·K,) on the layout's device; one small tensor per shape, shared."""
    pos = int4_row_positions(layout, out_features, in_features)
    return pos.reshape(-1).to("cuda" if layout == "cuda" else "cpu")


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
