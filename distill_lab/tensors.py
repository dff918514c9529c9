"""Tensors that share memory: the one storage-identity helper of the package.

A tied LM head and its embedding are one tensor in two modules; a packed int4 layer keeps several
views of one buffer. Counting bytes or saving weights must count each piece of memory once.
"""

from __future__ import annotations

from typing import Iterable

import torch

from torch import nn

__all__ = ["memory_bytes", "same_tensor", "storage_key", "unique_tensors"]


def storage_key(t: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
    """(storage address, offset, numel, dtype): equal for two tensors that are views of the same memory.

    A meta tensor has no memory (every address is 0): its identity is the tensor object itself, which is
    what a tied weight of a meta model shares.
    """
    address = id(t) if t.is_meta else t.untyped_storage().data_ptr()
    return (address, t.storage_offset(), t.numel(), t.dtype)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """True when ``a`` and ``b`` are the same memory with the same shape and strides (e.g. a tied head)."""
    return (a is not None and b is not None and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with each piece of memory kept once (first occurrence wins), in order."""
    seen, out = set(), []
    for t in tensors:
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters and buffers in memory (tied or shared tensors counted once).

    The package's one count of bytes in memory; bytes on disk are ``serialization.weights_bytes``.
    """
    return sum(t.numel() * t.element_size() for t in unique_tensors([*model.parameters(), *model.buffers()]))
