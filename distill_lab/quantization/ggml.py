"""ggml's block quantizations (Q4_1, Q8_0) built from our codes and scales, without a second rounding.

The GGUF mapping of each format (``ModuleFormat.to_ggml``, registered in ``formats``) returns a
``GGMLTensor``: the blocks of one weight, row by row, ready for ``export.to_gguf``. Layouts follow
ggml (Gerganov et al., llama.cpp, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) as
``gguf.quants`` reads them. numpy only: tensors in, blocks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QK", "GGMLTensor", "fp16_exact", "int4_q4_1_parts", "q4_1_blocks", "q8_0_blocks"]

QK = 32  # ggml block size of Q4_1 and Q8_0


@dataclass
class GGMLTensor:
    """One weight as ggml blocks: ``data`` (N, bytes per row) of type ``ggml_type`` ('Q4_1', 'Q8_0').

    Rows stay rows, so llama.cpp's q/k row permutation moves whole rows of blocks. ``groups`` and
    ``rounded`` count our scale groups written and those whose offset or scale was rounded to fp16;
    ``note`` says when the weight was re-quantized (a second rounding).
    """

    data: np.ndarray
    ggml_type: str
    groups: int = 0
    rounded: int = 0
    note: str | None = None


def fp16_exact(x: np.ndarray) -> np.ndarray:
    """True where the float32 value survives a round trip through fp16 unchanged."""
    return x.astype(np.float16).astype(np.float32) == x


def q4_1_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray, group_size: int) -> np.ndarray:
    """(N, K) codes in [0, 15], (N, K/g) fp32 ``d`` and ``m`` -> (N, K/32·20) uint8 Q4_1 blocks.

    One block: fp16 ``d``, fp16 ``m``, then 16 bytes holding element ``j`` in the low nibble
    and element ``j + 16`` in the high nibble of byte ``j``; it decodes to ``d·q + m``.
    """
    n, k = codes.shape
    if k % QK or group_size % QK:
        raise ValueError(f"Q4_1 needs in_features ({k}) and group_size ({group_size}) divisible by {QK}")
    per = group_size // QK
    dd = np.repeat(d.astype(np.float16), per, axis=1).reshape(-1, 1)  # (N·K/32, 1)
    mm = np.repeat(m.astype(np.float16), per, axis=1).reshape(-1, 1)
    q = codes.astype(np.uint8).reshape(-1, QK)  # (N·K/32, 32)
    qs = q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))  # (N·K/32, 16)
    blocks = np.concatenate([dd.view(np.uint8), mm.view(np.uint8), qs], axis=1)  # (N·K/32, 20)
    return blocks.reshape(n, -1)


def q8_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, K) int8 codes and (N,) per-row scales -> (N, K/32·34) uint8 Q8_0 blocks (fp16 d, 32 int8)."""
    n, k = codes.shape
    if k % QK:
        raise ValueError(f"Q8_0 needs a row length ({k}) divisible by {QK}")
    d = np.repeat(scales.astype(np.float16).reshape(n, 1), k // QK, axis=1).reshape(-1, 1)  # (N·K/32, 1)
    q = codes.astype(np.int8).reshape(-1, QK).view(np.uint8)
    return np.concatenate([d.view(np.uint8), q], axis=1).reshape(n, -1)


def int4_q4_1_parts(module) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Codes (N, K) and Q4_1 ``d``, ``m`` (N, K/g) fp32 of an int4 module, plus the number of groups not exact in fp16.

    ``module`` is an ``Int4WeightOnlyLinear`` or ``Int4Embedding`` (its ``codes()`` and bf16
    ``scales_and_zeros``). ``w = (q - 8)·s + z = s·q + (z - 8·s)``; both terms are computed
    exactly in fp32 from bf16.
    """
    codes = module.codes().cpu().numpy()  # (N, K) uint8
    sz = module.scales_and_zeros.float().cpu()  # (K/g, N, 2)
    s = sz[..., 0].t().contiguous().numpy()  # (N, K/g)
    z = sz[..., 1].t().contiguous().numpy()
    m = (z - 8 * s).astype(np.float32)
    inexact = int((~(fp16_exact(s) & fp16_exact(m))).sum())
    return codes, s, m, inexact
