"""Does pruning make a model faster? Dense vs pruned models, and one Linear dense vs 2:4, timed here.

Unstructured zeros stored dense run at dense speed; structured pruning gives a smaller dense model
that is faster everywhere; a 2:4 kernel exists only on CUDA sm80+. Every time is a median from
``distill_lab.timing.median_seconds`` / ``timed``, and every ratio is against a baseline measured
in the same call.
"""

from __future__ import annotations

import statistics
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..evaluate import timing_prompts
from ..hardware import resolve_bf16
from ..pruning.masks import nm_mask
from ..pruning.sparse_storage import semi_structured_available
from ..runtime import autocast, device_of
from ..timing import median_seconds, timed

__all__ = ["compare_speed", "semi_structured_speed"]


@torch.inference_mode()
def semi_structured_speed(out_features: int = 1536, in_features: int = 576, tokens: int = 2048,
                          device: str | torch.device | None = None, repeats: int = 10) -> dict:
    """Time one Linear: dense vs 2:4-pruned, with the best kernel this device has; return times and speedups.

    On CUDA sm80+ the 2:4 weight runs through ``to_sparse_semi_structured`` (fp16). Elsewhere
    there is no 2:4 kernel: the 2:4-pruned weight is timed stored dense (same kernel, same
    time) and as CSR, and ``kernel`` says so.
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    ok, why = semi_structured_available() if device.type == "cuda" else (False, semi_structured_available()[1])
    dtype = torch.float16 if ok else torch.float32
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(device, dtype)
    w = w * nm_mask(w.abs().float(), 2, 4).to(dtype)
    x = torch.randn(tokens, in_features, generator=g).to(device, dtype)  # (N, in)
    result = {"shape": [tokens, in_features, out_features], "device": str(device), "dtype": str(dtype),
              "kernel": why}

    def median(fn, n=repeats):
        return median_seconds(fn, repeats=n, warmup=2, device=device)

    result["dense_s"] = median(lambda: F.linear(x, w))
    if ok:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        result["sparse_24_s"] = median(lambda: F.linear(x, ws))
        result["speedup_24"] = result["dense_s"] / result["sparse_24_s"]
    else:
        wd = w.clone()  # the 2:4-pruned matrix, stored dense: the same dense kernel runs
        result["sparse_24_s"] = median(lambda: F.linear(x, wd))
        result["speedup_24"] = result["dense_s"] / result["sparse_24_s"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            wc = w.to_sparse_csr()
        result["csr_s"] = median(lambda: torch.sparse.mm(wc, x.t()), max(2, repeats // 3))
        result["speedup_csr"] = result["dense_s"] / result["csr_s"]
    return result


@torch.inference_mode()
def compare_speed(models: dict[str, nn.Module], batch: int = 8, seq: int = 256, decode_tokens: int = 16,
                  repeats: int = 3, warmup: int = 1, bf16: bool = False, seed: int = 0,
                  decode: bool = True, progress: bool = False) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of several models, timed interleaved (A, B, C, A, B, C, ...), medians.

    Interleaving makes the ratios fair on a busy machine: a slow moment hits every model alike.
    Prefill is one forward over (batch, seq) random tokens; decode is ``decode_tokens`` greedy
    steps at batch 1 after a 32-token prompt, with the KV cache.
    """
    first = next(iter(models.values()))
    device = device_of(first)
    vocab = first.config.vocab_size
    prompt, short = timing_prompts(vocab, batch, seq, 32, seed, device)  # (B, T), (1, 32)
    use_bf16 = resolve_bf16(bf16, device)  # prefill's choice
    decode_bf16 = resolve_bf16(bf16, device, phase="decode")

    def prefill(model):
        def run():
            with autocast(device, use_bf16):
                model(prompt, use_cache=False)
        return timed(run, device)

    def run_decode(model):
        with autocast(device, decode_bf16):
            out = model(short, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token (1, 1)

            def steps():
                nonlocal cache, token
                for _ in range(decode_tokens):
                    out = model(token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            return timed(steps, device)

    times = {name: {"prefill": [], "decode": []} for name in models}
    total = (warmup + repeats) * len(models)
    bar = tqdm(total=total, desc="timing", leave=False, disable=not progress)
    for r in range(warmup + repeats):
        for name, model in models.items():
            p = prefill(model)
            d = run_decode(model) if decode else float("nan")
            if r >= warmup:
                times[name]["prefill"].append(p)
                times[name]["decode"].append(d)
            bar.update(1)
    bar.close()
    out = {}
    for name, t in times.items():
        p, d = statistics.median(t["prefill"]), statistics.median(t["decode"])
        out[name] = {"prefill_tokens_per_s": batch * seq / p, "prefill_s": p,
                     "decode_tokens_per_s": decode_tokens / d if decode else float("nan"),
                     "decode_ms_per_token": 1000 * d / decode_tokens if decode else float("nan")}
    return out
