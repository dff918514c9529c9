"""Does pruning make a Linear faster? One Linear dense vs 2:4-pruned, timed here (whole models: ``evaluate.compare_speed``).

Unstructured zeros stored dense run at dense speed; structured pruning gives a smaller dense model
that is faster everywhere; a 2:4 kernel exists only on CUDA sm80+. Every time is a median of rounds
timed round-robin (``distill_lab.timing.interleaved_times``), and every ratio is a ``SpeedRatio``
against a baseline timed in the same rounds: its median and its spread.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..profiles import default_device
from ..pruning.masks import nm_mask
from ..pruning.sparse_storage import semi_structured_available
from ..timing import MIN_ROUNDS, SpeedRatio, interleaved_times, medians, timed

__all__ = ["semi_structured_speed"]


@torch.inference_mode()
def semi_structured_speed(out_features: int = 1536, in_features: int = 576, tokens: int = 2048,
                          device: str | torch.device | None = None, repeats: int = 10) -> dict:
    """Time one Linear: dense vs 2:4-pruned, with the best kernel this device has; median times and ``SpeedRatio``s.

    On CUDA sm80+ the 2:4 weight runs through ``to_sparse_semi_structured`` (fp16). Elsewhere
    there is no 2:4 kernel: the 2:4-pruned weight is timed stored dense (same kernel, same
    time) and as CSR, and ``kernel`` says so.
    """
    device = torch.device(device) if device is not None else default_device()
    ok, why = semi_structured_available() if device.type == "cuda" else (False, semi_structured_available()[1])
    dtype = torch.float16 if ok else torch.float32
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(device, dtype)
    w = w * nm_mask(w.abs().float(), 2, 4).to(dtype)
    x = torch.randn(tokens, in_features, generator=g).to(device, dtype)  # (N, in)
    result = {"shape": [tokens, in_features, out_features], "device": str(device), "dtype": str(dtype),
              "kernel": why}

    probes = {"dense": lambda: timed(lambda: F.linear(x, w), device)}
    if ok:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        probes["sparse_24"] = lambda: timed(lambda: F.linear(x, ws), device)
    else:
        wd = w.clone()  # the 2:4-pruned matrix, stored dense: the same dense kernel runs
        probes["sparse_24"] = lambda: timed(lambda: F.linear(x, wd), device)
    times = interleaved_times(probes, repeats=repeats, warmup=2)
    med = medians(times)
    result["dense_s"], result["sparse_24_s"] = med["dense"], med["sparse_24"]
    result["speedup_24"] = SpeedRatio.of_rounds(times["dense"], times["sparse_24"])
    if not ok:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            wc = w.to_sparse_csr()
        csr = {"dense": probes["dense"], "csr": lambda: timed(lambda: torch.sparse.mm(wc, x.t()), device)}
        times = interleaved_times(csr, repeats=max(MIN_ROUNDS, repeats // 3), warmup=1)  # CSR is slow: fewer rounds
        result["csr_s"] = medians(times)["csr"]
        result["speedup_csr"] = SpeedRatio.of_rounds(times["dense"], times["csr"])
    return result
