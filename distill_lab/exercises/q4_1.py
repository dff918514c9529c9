"""Algorithm lab of notebook 04: Q4_1 by hand, byte for byte, into a GGUF file and back.

ggml's Q4_1 (llama.cpp; layout in https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) stores
blocks of 32 weights in 20 bytes: an fp16 step ``d = (max - min) / 15``, an fp16 minimum ``m``, then 16
bytes of 4-bit codes ``q = round((w - m) / d)`` in 0..15, element ``j`` in the low nibble and element
``j + 16`` in the high nibble of byte ``j``. A block decodes to ``d·q + m``.

The learner writes ``pack_q4_1(w) -> blocks`` and ``unpack_q4_1(blocks, k) -> w``; the reference is the
``gguf`` package's own ``gguf.quants`` (what llama.cpp's Python tools use). :func:`gguf_round_trip` packs a
teacher weight with the learner's function, writes it into a one-tensor GGUF file with ``gguf.GGUFWriter``,
reads it back with ``gguf.GGUFReader`` and decodes it with ``gguf.quants`` and with the learner's unpacker.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ._check import check, label_of, yours_or_reference

__all__ = ["BLOCK", "check_pack_q4_1", "check_unpack_q4_1", "gguf_round_trip", "pack_q4_1_reference",
           "unpack_q4_1_reference"]

BLOCK = 32  # weights per Q4_1 block (ggml's QK4_1)
_Q4_1 = gguf.GGMLQuantizationType.Q4_1


def pack_q4_1_reference(w: np.ndarray) -> np.ndarray:
    """(N, K) float32 -> (N, K/32·20) uint8 Q4_1 blocks, as ``gguf.quants.quantize`` writes them."""
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _Q4_1)


def unpack_q4_1_reference(blocks: np.ndarray, k: int) -> np.ndarray:
    """(N, K/32·20) uint8 Q4_1 blocks -> (N, K) float32, as ``gguf.quants.dequantize`` reads them."""
    return gguf.quants.dequantize(np.ascontiguousarray(blocks, dtype=np.uint8), _Q4_1).reshape(-1, k)


def _pack_variant(levels=15, interleaved=False, swap_nibbles=False, zero_min=False):
    """A wrong Q4_1 packer (the step, the nibble layout, the minimum)."""
    def wrong(w):
        n, k = w.shape
        b = np.asarray(w, dtype=np.float32).reshape(-1, BLOCK)  # (N·K/32, 32)
        lo = np.zeros_like(b[:, :1]) if zero_min else b.min(1, keepdims=True)
        d = (b.max(1, keepdims=True) - lo) / levels
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        q = np.clip(np.trunc((b - lo) * inv + np.float32(0.5)), 0, 15).astype(np.uint8)  # (.., 32)
        first, second = (q[:, 0::2], q[:, 1::2]) if interleaved else (q[:, :16], q[:, 16:])
        qs = (second | (first << 4)) if swap_nibbles else (first | (second << 4))
        out = np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8), qs], 1)
        return out.reshape(n, -1)
    return wrong


_PACK_MISTAKES = [
    ("levels off by one: 4 bits give 16 codes, 0 … 15, so d = (max - min) / 15", _pack_variant(levels=16)),
    ("neighbours share a byte: Q4_1 puts element j in the low nibble and element j + 16 in the high nibble of "
     "byte j (not elements 2j and 2j + 1)", _pack_variant(interleaved=True)),
    ("nibbles swapped: element j goes in the low 4 bits, element j + 16 in the high 4 bits", _pack_variant(
        swap_nibbles=True)),
    ("no minimum: Q4_1 is asymmetric, d·q + m with m = the block's minimum (Q4_0 is the symmetric one)",
     _pack_variant(zero_min=True)),
]


def _blocks_close(got, want, case) -> str | None:
    """Same shape, same fp16 d and m bytes, and codes equal but for rare rounding ties (one step on <= 0.5 %)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != np.uint8:
        return f"shape {got.shape} {got.dtype}, expected {want.shape} uint8 (20 bytes per block of 32)"
    g, w = got.reshape(-1, 20), want.reshape(-1, 20)
    if not np.array_equal(g[:, :4], w[:, :4]):
        bad = int((g[:, :4] != w[:, :4]).any(1).sum())
        return f"the fp16 d and m (first 4 bytes) differ in {bad} of {len(g)} blocks"
    gq = np.stack([g[:, 4:] & 15, g[:, 4:] >> 4], 1).astype(int)
    wq = np.stack([w[:, 4:] & 15, w[:, 4:] >> 4], 1).astype(int)
    off = np.abs(gq - wq)
    if off.max() <= 1 and (off > 0).mean() <= 0.005:
        return None
    return f"{int((off > 0).sum())} of {off.size} codes differ (largest difference {int(off.max())})"


def check_pack_q4_1(fn, weight=None) -> bool:
    """Check ``fn(w) -> blocks``: Q4_1 of an (N, K) float32 array, K a multiple of 32; ``weight``: a teacher tensor."""
    r = np.random.default_rng(13)
    cases = [(r.normal(size=(2, 32)).astype(np.float32),), (r.normal(size=(3, 64)).astype(np.float32) * 0.02 + 0.01,),
             ((r.integers(0, 16, size=(4, 96)) * 0.1 - 0.7).astype(np.float32),)]  # already on a 4-bit grid
    labels = [None, None, "values already on a 4-bit grid"]
    if weight is not None:
        cases.append((weight.detach().float().cpu().numpy(),))
        labels.append(f"the teacher's weight {tuple(weight.shape)}")
    return check("Q4_1 packing", fn, pack_q4_1_reference, cases, labels=labels, mistakes=_PACK_MISTAKES,
                 compare=_blocks_close)


def check_unpack_q4_1(fn) -> bool:
    """Check ``fn(blocks, k) -> (N, K) float32``: decode Q4_1 blocks (``d·q + m`` per element)."""
    r = np.random.default_rng(14)
    cases = [(pack_q4_1_reference(r.normal(size=(n, k)).astype(np.float32)), k) for n, k in ((2, 32), (3, 128))]

    def swapped(blocks, k):
        b = np.asarray(blocks).reshape(-1, 20).copy()
        b[:, 4:] = (b[:, 4:] >> 4) | (b[:, 4:] << 4)
        return unpack_q4_1_reference(b.reshape(np.asarray(blocks).shape), k)

    def no_min(blocks, k):
        b = np.asarray(blocks).reshape(-1, 20).copy()
        b[:, 2:4] = 0  # fp16 zero
        return unpack_q4_1_reference(b.reshape(np.asarray(blocks).shape), k)

    mistakes = [("nibbles swapped: the low 4 bits of byte j are element j, the high 4 bits element j + 16", swapped),
                ("the minimum is missing: each element decodes to d·q + m", no_min)]
    return check("Q4_1 unpacking", fn, unpack_q4_1_reference, cases, atol=1e-6, rtol=1e-5, mistakes=mistakes)


def gguf_round_trip(weight: torch.Tensor, pack_q4_1, unpack_q4_1, path: str | Path, name: str = "blk.0.ffn_down.weight"):
    """Pack ``weight`` (N, K) with the learner's Q4_1, write it into a GGUF file, read it back and decode it.

    Returns ``{"file_bytes", "fp32_bytes", "same_bytes_as_gguf", "max_error_yours", "max_error_gguf",
    "yours_equals_gguf", "by"}``: the file's size, whether the learner's blocks equal ``gguf.quants``' byte
    for byte, the largest error against the float weight after decoding with the learner's unpacker and with
    ``gguf.quants``, and whether both decodings agree.
    """
    pack = yours_or_reference(pack_q4_1, pack_q4_1_reference, "my_pack_q4_1")
    unpack = yours_or_reference(unpack_q4_1, unpack_q4_1_reference, "my_unpack_q4_1")
    w = weight.detach().float().cpu().numpy()
    n, k = w.shape
    blocks = np.asarray(pack(w), dtype=np.uint8)  # (N, K/32·20)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=_Q4_1)  # the byte shape: (N, K/32·20)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    read = np.array(tensor.data, dtype=np.uint8).reshape(n, -1)  # a writable copy of the file's bytes
    by_gguf = unpack_q4_1_reference(read, k)
    by_yours = np.asarray(unpack(read, k), dtype=np.float32).reshape(n, k)
    return {"file_bytes": path.stat().st_size, "fp32_bytes": w.nbytes,
            "same_bytes_as_gguf": bool(np.array_equal(read, pack_q4_1_reference(w))),
            "max_error_yours": float(np.abs(by_yours - w).max()), "max_error_gguf": float(np.abs(by_gguf - w).max()),
            "yours_equals_gguf": bool(np.allclose(by_yours, by_gguf, atol=1e-6, rtol=1e-5)),
            "by": label_of(pack, unpack)}
