"""What every step is judged by: perplexity on the evaluation windows, size and speed,
each also relative to the teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..arch import parameter_count
from ..data import corpus_windows
from ..evaluate import latency, perplexity
from ..profiles import Profile
from ..serialization import weights_bytes

__all__ = ["SPEED_KEYS", "eval_windows", "logical_parameters", "measure", "measure_speed", "relative"]


def eval_windows(tokenizer, profile: Profile) -> dict[str, torch.Tensor]:
    """The test windows every step is scored on: pydoc (in-domain) and stdlib-code (out-of-domain).

    ``profile.recipe_eval_windows`` windows of ``profile.seq_len`` tokens per corpus: a recipe measures
    every step and every row of the claims table, so the laptop profile scores fewer windows here
    (16 x 256 tokens) than the lessons' own evaluations (40).
    """

    return {name: corpus_windows(name, "test", tokenizer, profile.seq_len, max_windows=profile.recipe_eval_windows)
            for name in ("pydoc", "stdlib-code")}


def logical_parameters(model: nn.Module) -> int:
    """Parameters the model's architecture holds (counted from its config, so quantized models count too)."""

    return parameter_count(model.config)  # any family: biases, norms and all experts included


# speed depends on the machine and its load at the moment, so it is never reused from an earlier run:
# every speed-up divides two speeds measured in the same run
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token")


def measure_speed(model: nn.Module, profile: Profile) -> dict:
    """Prefill tokens/s, decode tokens/s and ms/token of one model, at the profile's recipe sizes.

    Prefill is timed on ``profile.recipe_latency_batch`` sequences of ``latency_seq`` tokens (a recipe
    times every step and every table row: the laptop profile uses 4, half the lessons' batch), decode
    on ``decode_tokens`` new tokens at batch 1; the median of ``repeats`` runs after a warm-up.
    """

    lat = latency(model, batch=profile.recipe_latency_batch, seq=profile.latency_seq,
                  decode_tokens=profile.decode_tokens, repeats=profile.repeats)
    return {k: lat[k] for k in SPEED_KEYS}


def measure(model: nn.Module, windows: dict[str, torch.Tensor], profile: Profile,
            folder: str | Path | None = None, progress: bool = False) -> dict:
    """Perplexity on each window set, size on disk, parameters, prefill and decode speed of one model."""

    metrics = {}
    for name, w in windows.items():
        metrics[f"ppl_{name}"] = perplexity(model, w, batch_size=profile.batch_size, progress=progress)
    metrics["size_bytes"] = weights_bytes(folder if folder is not None else model)
    metrics["params"] = logical_parameters(model)
    metrics.update(measure_speed(model, profile))
    return metrics


def relative(metrics: dict, base: dict) -> dict:
    """Ratios against the teacher: ppl ratio, Δppl %, size reduction, prefill and decode speedups."""
    out = {}
    for key in metrics:
        if key.startswith("ppl_") and key in base:
            name = key[4:]
            out[f"ppl_ratio_{name}"] = metrics[key] / base[key]
            out[f"dppl_pct_{name}"] = 100.0 * (metrics[key] / base[key] - 1.0)
    out["size_reduction"] = base["size_bytes"] / metrics["size_bytes"]
    out["prefill_speedup"] = metrics["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    out["decode_speedup"] = metrics["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return out
