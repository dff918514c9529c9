"""The int4 token embedding: group-wise 4-bit rows that a tied output head multiplies with on the int4 kernel.

``Int4Embedding`` stores its codes, scales and zeros exactly as ``Int4WeightOnlyLinear`` does
(``w = (q - 8)·scale + zero``, bf16 scales and zeros, the packed tensor in the layout of the
device's int4 kernel), so ``tied_head()`` is an ``Int4WeightOnlyLinear`` over the very same
tensors: the (V, D) table is stored once and the head's matmul runs on the kernel. A lookup reads
the bytes of the looked-up rows only (``gather_int4_rows``) and dequantizes those rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..arch import embedding_scale
from .int4_kernels import (dequantize_int4, gather_int4_rows, int4_codes_and_scales, int4_layout_for,
                           int4_row_positions, pack_int4, to_kernel_layout, unpack_int4)
from .modules import Int4WeightOnlyLinear, QuantizedModule

__all__ = ["INT4_EMBEDDING_GROUP", "Int4Embedding"]

INT4_EMBEDDING_GROUP = 64  # hidden-dim values per scale and zero of an int4 embedding (embedding_bits=4)
_CODES_CHUNK = 8192  # rows per step when every row is read back (bounds the (rows, D) int64 offsets)


class Int4Embedding(QuantizedModule):
    """Token embedding with asymmetric int4 groups of ``group_size`` along the hidden dim, two codes per byte."""

    kind = "int4_embedding"

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = INT4_EMBEDDING_GROUP,
                 out_dtype=torch.float32, embed_scale: float = 1.0, layout: str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape  # (V, D) codes in [0, 15]
        if self.embedding_dim % group_size:
            raise ValueError(f"embedding_dim={self.embedding_dim} is not divisible by group_size={group_size}; "
                             "allowed: a group size that divides the hidden size")
        self.group_size, self.out_dtype = group_size, out_dtype
        self.embed_scale = float(embed_scale)  # output factor of scaled embeddings (Gemma: sqrt(hidden))
        self.layout = layout or int4_layout_for(codes.device, self.num_embeddings, self.embedding_dim, group_size)
        packed = to_kernel_layout(codes, self.layout)
        if self.layout != "plain" and not self._rows_readable(packed, codes):
            warnings.warn(f"Int4Embedding: rows of the {self.layout!r} int4 layout of a {tuple(codes.shape)} table "
                          "could not be read back one by one; using the 'plain' layout (its tied head runs the "
                          "pure-PyTorch int4 fallback)", RuntimeWarning, stacklevel=2)
            self.layout, packed = "plain", pack_int4(codes)
        self.register_buffer("packed", packed)  # V·D/2 bytes in the layout of the head's kernel
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())  # (D/g, V, 2)
        self._positions = None  # (B, K) nibble offsets of a row in `packed`, on its device (a cache, not state)

    @classmethod
    def from_float(cls, emb: nn.Embedding, group_size: int = INT4_EMBEDDING_GROUP) -> Int4Embedding:
        """Quantize each row's groups of ``group_size`` to 4 bits on a min/max grid (keeping any output scale)."""
        codes, sz = int4_codes_and_scales(emb.weight, group_size, 4, symmetric=False)  # (V, D), (D/g, V, 2)
        return cls(codes, sz, group_size, emb.weight.dtype, embedding_scale(emb))

    def _rows_readable(self, packed: torch.Tensor, codes: torch.Tensor) -> bool:
        """True when rows read back from ``packed`` equal ``codes`` (first, last and evenly spread rows)."""
        v = self.num_embeddings
        probe = torch.cat([torch.arange(min(v, 256)), torch.linspace(0, v - 1, 257).long(),
                           torch.arange(max(0, v - 256), v)]).unique().to(codes.device)
        try:
            positions = int4_row_positions(self.layout, v, self.embedding_dim).to(codes.device)
        except RuntimeError:
            return False
        return torch.equal(gather_int4_rows(packed, positions, probe), codes[probe].to(torch.uint8))

    def _row_positions(self) -> torch.Tensor:
        if self._positions is None or self._positions.device != self.packed.device:
            self._positions = int4_row_positions(self.layout, self.num_embeddings,
                                                 self.embedding_dim).to(self.packed.device)
        return self._positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (M,)
        codes = gather_int4_rows(self.packed, self._row_positions(), flat)  # (M, D): only these rows' bytes
        rows = dequantize_int4(codes, self.group_size, self.scales_and_zeros[:, flat], torch.float32)  # (M, D)
        if self.embed_scale != 1.0:
            rows = rows * self.embed_scale
        return rows.to(self.out_dtype).reshape(*ids.shape, self.embedding_dim)  # (B, T, D)

    def codes(self) -> torch.Tensor:
        """The (V, D) uint8 codes in [0, 15], read back from the packed layout."""
        ids = torch.arange(self.num_embeddings, device=self.packed.device)
        positions = self._row_positions()
        return torch.cat([gather_int4_rows(self.packed, positions, ids[i:i + _CODES_CHUNK])
                          for i in range(0, self.num_embeddings, _CODES_CHUNK)])

    def dequantized_weight(self) -> torch.Tensor:
        """The (V, D) float table the lookup reads (before the output scale of scaled embeddings)."""
        return dequantize_int4(self.codes(), self.group_size, self.scales_and_zeros, torch.float32)

    def tied_head(self) -> Int4WeightOnlyLinear:
        """The output head ``x @ table.T`` on the int4 kernel, over this embedding's own tensors (not a copy)."""
        return Int4WeightOnlyLinear.from_packed(self.packed, self.scales_and_zeros, self.group_size, self.layout,
                                                self.num_embeddings, self.embedding_dim)

    def logical_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The portable layout: (V, D/2) uint8, even k in the low nibble, and (D/g, V, 2) bf16 scales and zeros."""
        return {"packed": pack_int4(self.codes()).cpu(), "scales_and_zeros": self.scales_and_zeros.cpu()}

    @classmethod
    def from_exported(cls, tensors: dict, spec: dict, device) -> Int4Embedding:
        """Rebuild from ``export_tensors`` output and ``spec``, re-packed for the kernel of ``device``."""
        codes = unpack_int4(tensors["packed"]).to(device)  # (V, D)
        return cls(codes, tensors["scales_and_zeros"].to(device), spec["group_size"],
                   getattr(torch, spec.get("out_dtype", "float32")), spec.get("embed_scale", 1.0))

    def spec(self) -> dict:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "group_size": self.group_size, "embed_scale": self.embed_scale,
                "out_dtype": str(self.out_dtype).replace("torch.", "")}

    def extra_repr(self) -> str:
        scale = f", x{self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, int4 g{self.group_size} asym{scale}, "
                f"layout={self.layout}")
