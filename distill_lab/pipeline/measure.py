"""What every step is judged by: perplexity on the evaluation windows, size and speed,
each also relative to the teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..arch import parameter_count
from ..data import corpus_windows
from ..evaluate import compare_speed, latency, perplexity
from ..profiles import Profile
from ..serialization import weights_bytes
from ..timing import SpeedRatio

__all__ = ["SPEED_KEYS", "eval_windows", "logical_parameters", "measure", "measure_speed", "relative", "speedup"]


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
# every speed-up divides two speeds measured in the same run (with ``against``, in the same rounds)
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "prefill_speedup",
              "decode_speedup", "prefill_speedup_iqr", "decode_speedup_iqr", "speed_rounds")


def measure_speed(model: nn.Module, profile: Profile, against: nn.Module | None = None) -> dict:
    """Prefill tokens/s, decode tokens/s and ms/token of one model, at the profile's recipe sizes.

    Prefill is timed on ``profile.recipe_latency_batch`` sequences of ``latency_seq`` tokens (a recipe
    times every step and every table row: the laptop profile uses 4, half the lessons' batch), decode
    on ``decode_tokens`` new tokens at batch 1; the median of ``repeats`` runs after a warm-up.
    With ``against`` (the teacher), both are timed round-robin in the same rounds, and the result also
    holds the speed-ups over it: ``prefill_speedup`` / ``decode_speedup`` (medians of the per-round
    ratios), their interquartile ranges ``*_speedup_iqr`` and ``speed_rounds`` (``speedup`` rebuilds the
    ``SpeedRatio``).
    """

    if against is None:
        lat = latency(model, batch=profile.recipe_latency_batch, seq=profile.latency_seq,
                      decode_tokens=profile.decode_tokens, repeats=profile.repeats)
        return {k: lat[k] for k in SPEED_KEYS if k in lat}
    rows = compare_speed({"teacher": against, "model": model}, batch=profile.recipe_latency_batch,
                         seq=profile.latency_seq, decode_tokens=profile.decode_tokens, repeats=profile.repeats,
                         baseline="teacher")
    row = rows["model"]
    out = {k: row[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token")}
    for phase in ("prefill", "decode"):
        r = row[f"{phase}_speedup"]
        out[f"{phase}_speedup"], out[f"{phase}_speedup_iqr"] = r.median, [r.low, r.high]
    out["speed_rounds"] = row["prefill_speedup"].rounds
    return out


def speedup(metrics: dict, phase: str) -> SpeedRatio:
    """The ``SpeedRatio`` of ``phase`` ('prefill' or 'decode') in a step's metrics (one round when unpaired)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase={phase!r}; allowed: 'prefill', 'decode'")
    median = metrics[f"{phase}_speedup"]
    low, high = metrics.get(f"{phase}_speedup_iqr") or (median, median)
    return SpeedRatio(median, low, high, metrics.get("speed_rounds", 1) if f"{phase}_speedup_iqr" in metrics else 1)


def measure(model: nn.Module, windows: dict[str, torch.Tensor], profile: Profile,
            folder: str | Path | None = None, progress: bool = False, against: nn.Module | None = None) -> dict:
    """Perplexity on each window set, size on disk, parameters, prefill and decode speed of one model
    (with ``against``, timed in the same rounds as it: see ``measure_speed``)."""

    metrics = {}
    for name, w in windows.items():
        metrics[f"ppl_{name}"] = perplexity(model, w, batch_size=profile.batch_size, progress=progress)
    metrics["size_bytes"] = weights_bytes(folder if folder is not None else model)
    metrics["params"] = logical_parameters(model)
    metrics.update(measure_speed(model, profile, against=against))
    return metrics


def relative(metrics: dict, base: dict) -> dict:
    """Ratios against the teacher: ppl ratio, Δppl %, size reduction, prefill and decode speedups
    (speed-ups ``measure_speed`` already timed in the same rounds as the teacher are kept as they are)."""
    out = {}
    for key in metrics:
        if key.startswith("ppl_") and key in base:
            name = key[4:]
            out[f"ppl_ratio_{name}"] = metrics[key] / base[key]
            out[f"dppl_pct_{name}"] = 100.0 * (metrics[key] / base[key] - 1.0)
    out["size_reduction"] = base["size_bytes"] / metrics["size_bytes"]
    for phase in ("prefill", "decode"):  # a speed-up timed in the same rounds as the teacher stands
        if f"{phase}_speedup_iqr" not in metrics:
            out[f"{phase}_speedup"] = metrics[f"{phase}_tokens_per_s"] / base[f"{phase}_tokens_per_s"]
    return out
