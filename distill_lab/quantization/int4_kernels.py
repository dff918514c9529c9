"""The int4 weight-only kernels PyTorch ships, their packed layout and the reads of it, with pure-PyTorch fallbacks.

* Weight-only int4 with group-wise scales and zeros: ``aten._weight_int4pack_mm[_for_cpu]``, the
  "tinygemm" layout torchao uses, with its packing (``to_kernel_layout``) and a way back to the codes.
* ``int4_linear``: the integer kernel or a float GEMM on the weight dequantized for the call
  (``int4_dequantize_packed``), whichever ``dispatch`` measured faster on this CPU for the phase.
* Row reads of a packed int4 weight (``int4_row_positions``, ``gather_int4_rows``): an int4
  embedding looks up a few rows of the very tensor its tied head multiplies with.

``kernels.use_kernels(False)`` forces every fallback here too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .kernels import DEQUANT_PATHS, kernels_enabled
from .primitives import SCALE_EPS, QuantizedTensor, quantize_tensor

__all__ = ["dequantize_int4", "gather_int4_rows", "int4_codes_and_scales", "int4_dequantize_packed",
           "int4_kernel_codes", "INT4_KERNEL_GROUPS", "int4_layout_for", "int4_linear", "int4_mm",
           "int4_row_positions", "pack_int4", "to_kernel_layout", "unpack_int4", "unpack_kernel_layout"]

aten = torch.ops.aten

INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 kernels accept


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
