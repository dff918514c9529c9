"""Model-level plumbing shared by the labs: the teacher's Linear layers, and their weights swapped for a while.

A lab plugs the learner's tensor function into the real model through these helpers, measures it and
puts the model back exactly as it was, so no copy of the 540 MB teacher is needed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["block_linears", "weights_replaced"]


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of every ``nn.Linear`` but the output head (tied to the embedding, which labs leave alone)."""
    embedding = model.get_input_embeddings().weight
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.data_ptr() != embedding.data_ptr() and name != "lm_head"}


@contextmanager
def weights_replaced(model: nn.Module, transform):
    """Inside the ``with`` block every block Linear holds ``transform(name, weight)``; the originals come back after.

    ``transform`` gets a float32 CPU copy of the weight (out, in) and returns a tensor of the same
    shape. The originals are restored even when the block (or ``transform``) raises.
    """
    originals = {}
    linears = block_linears(model)
    try:
        with torch.no_grad():
            for name, linear in linears.items():
                w = linear.weight
                new = torch.as_tensor(transform(name, w.detach().float().cpu().clone()))
                if tuple(new.shape) != tuple(w.shape):
                    raise ValueError(f"{name}: the function returned shape {tuple(new.shape)}, "
                                     f"expected {tuple(w.shape)}")
                originals[name] = w.data
                w.data = new.detach().to(device=w.device, dtype=w.dtype)
        yield model
    finally:
        for name, data in originals.items():
            linears[name].weight.data = data
