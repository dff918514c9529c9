"""One calibration pass: run token batches through a model while forward hooks record what they need.

SmoothQuant/AWQ activation statistics (``smoothquant``), GPTQ Hessians (``collect_hessians`` here, the
inputs' second moments of every Linear, which SparseGPT needs too), Wanda input
norms and structured-pruning importance (``prune``) all work the same way: register hooks on some
modules, run the calibration batches forward once, remove the hooks. The hooks differ; the pass
is this function, so every caller gets the same progress bar and removes its hooks even when a
forward fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .quantization.modules import embedding_and_head
from .runtime import device_of as _device_of
from .tensors import same_tensor

__all__ = ["calibration_pass", "collect_hessians"]


def calibration_pass(model: nn.Module, batches: Iterable[torch.Tensor], handles: list, *,
                     desc: str = "calibration", progress: bool = False,
                     before_batch: Callable[[torch.Tensor], None] | None = None, **forward_kwargs) -> int:
    """Run each (B, T) batch through ``model`` on its device, remove the hook ``handles``; return the tokens seen."""
    device = _device_of(model)
    tokens = 0
    try:
        for batch in tqdm(list(batches), desc=desc, leave=False, disable=not progress):
            if before_batch is not None:
                before_batch(batch)
            model(batch.to(device), **forward_kwargs)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return tokens


@torch.inference_mode()
def collect_hessians(model: nn.Module, batches, filter_fn=None, progress: bool = True) -> dict:
    """Return ``{linear name: XᵀX / n}`` (K, K) float64 over calibration batches (each (B, T) ids).

    Linears that read the same input (q/k/v, gate/up) share one tensor object. "The same input"
    means the same memory as the previous Linear's input, which is held until the next Linear runs:
    comparing addresses alone would also match a new tensor that the allocator placed where a freed
    one was (o_proj's input, then gate/up's), and give gate/up o_proj's Hessian.
    """
    sums, counts, alias, hooks = {}, {}, {}, []
    state = {"input": None, "owner": None}  # the previous Linear's input, kept alive

    def hook(name):
        def fn(module, args):
            x = args[0].detach()  # (B, T, K)
            if same_tensor(x, state["input"]):  # q/k/v or gate/up: share the first one's Hessian
                alias[name] = state["owner"]
                return
            state["input"], state["owner"] = x, name
            xd = x.reshape(-1, x.shape[-1]).double()  # (N, K)
            h = xd.t() @ xd  # (K, K)
            sums[name] = sums[name] + h if name in sums else h
            counts[name] = counts.get(name, 0) + xd.shape[0]
        return fn

    head = embedding_and_head(model)[1]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and (filter_fn is None or filter_fn(module, name)):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    calibration_pass(model, batches, hooks, desc="Hessians", progress=progress,
                     before_batch=lambda batch: state.update(input=None))
    state["input"] = None
    out = {k: (v / counts[k]).cpu() for k, v in sums.items()}
    for name, owner in alias.items():
        out[name] = out[owner]
    return out
