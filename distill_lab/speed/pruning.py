"""Does pruning make a model faster? Dense vs pruned models, and one Linear dense vs 2:4, timed here.

Unstructured zeros stored dense run at dense speed; structured pruning gives a smaller dense model
that is faster everywhere; a 2:4 kernel exists only on CUDA sm80+. Every time is a median from
``distill_lab.timing.median_seconds`` / ``timed``, and every ratio is against a baseline measured
in the same call.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate import phase_probes, speed_row
from ..profiles import default_device
from ..pruning.masks import nm_mask
from ..pruning.sparse_storage import semi_structured_available
from ..timing import interleaved_medians, median_seconds

__all__ = ["compare_speed", "semi_structured_speed"]


@torch.inference_mode()
def semi_structured_speed(out_features: int = 1536, in_features: int = 576, tokens: int = 2048,
                          device: str | torch.device | None = None, repeats: int = 10) -> dict:
    """Time one Linear: dense vs 2:4-pruned, with the best kernel this device has; return times and speedups.

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

    def seconds(fn, n=repeats):
        return median_seconds(fn, repeats=n, warmup=2, device=device)

    result["dense_s"] = seconds(lambda: F.linear(x, w))
    if ok:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        result["sparse_24_s"] = seconds(lambda: F.linear(x, ws))
        result["speedup_24"] = result["dense_s"] / result["sparse_24_s"]
    else:
        wd = w.clone()  # the 2:4-pruned matrix, stored dense: the same dense kernel runs
        result["sparse_24_s"] = seconds(lambda: F.linear(x, wd))
        result["speedup_24"] = result["dense_s"] / result["sparse_24_s"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            wc = w.to_sparse_csr()
        result["csr_s"] = seconds(lambda: torch.sparse.mm(wc, x.t()), max(2, repeats // 3))
        result["speedup_csr"] = result["dense_s"] / result["csr_s"]
    return result


def compare_speed(models: dict[str, nn.Module], batch: int = 8, seq: int = 256, decode_tokens: int = 16,
                  repeats: int = 3, warmup: int = 1, bf16: bool = False, seed: int = 0,
                  decode: bool = True, progress: bool = False) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of several models, timed interleaved (A, B, C, A, B, C, ...), medians.

    Interleaving makes the ratios fair on a busy machine: a slow moment hits every model alike.
    Each model is timed by ``evaluate.phase_probes`` (the harness ``evaluate.latency`` uses): prefill is
    one forward over (batch, seq) random tokens; decode is ``decode_tokens`` greedy steps at batch 1
    after a 32-token prompt, with the KV cache.
    """
    probes = {}
    for name, model in models.items():
        phases = phase_probes(model, batch, seq, decode_tokens, bf16, prompt_len=32, seed=seed)
        probes[(name, "prefill")] = phases["prefill"]
        if decode:
            probes[(name, "decode")] = phases["decode"]
    s = interleaved_medians(probes, repeats=repeats, warmup=warmup, progress=progress)
    return {name: speed_row(s[name, "prefill"], s.get((name, "decode"), float("nan")), batch, seq, decode_tokens)
            for name in models}
