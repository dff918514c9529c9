"""What every step is judged by: perplexity on the evaluation windows, size and speed,
each also relative to the teacher.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import llamacpp
from ..arch import parameter_count
from ..data import corpus_windows
from ..evaluate import compare_speed, perplexity
from ..export import to_gguf
from ..profiles import Profile
from ..serialization import weights_bytes
from ..timing import SpeedRatio

__all__ = ["SPEED_KEYS", "SPEED_PHASES", "eval_windows", "logical_parameters", "measure", "measure_speed",
           "measure_speeds", "relative", "speedup"]


def eval_windows(tokenizer, profile: Profile) -> dict[str, torch.Tensor]:
    """The test windows every step is scored on: pydoc (in-domain) and stdlib-code (out-of-domain).

    ``profile.recipe_eval_windows`` pydoc windows of ``profile.seq_len`` tokens, the lessons' 40 in the
    laptop profile (the claims table's quality column and its verdicts read them: 16 windows put the same
    model at a perplexity ratio of 1.24 where 40 measured 1.61), and ``profile.recipe_ood_windows``
    stdlib-code windows (8 in the laptop profile: a recipe measures every step and every row of the
    claims table, and no verdict reads that column).
    """
    sizes = {"pydoc": profile.recipe_eval_windows, "stdlib-code": profile.recipe_ood_windows}
    return {name: corpus_windows(name, "test", tokenizer, profile.seq_len, max_windows=n) for name, n in sizes.items()}


def logical_parameters(model: nn.Module) -> int:
    """Parameters the model's architecture holds (counted from its config, so quantized models count too)."""

    return parameter_count(model.config)  # any family: biases, norms and all experts included


# speed depends on the machine and its load at the moment, so it is never reused from an earlier run:
# every speed-up divides two speeds measured in the same run (with ``against``, in the same rounds)
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "decode_lean_tokens_per_s",
              "decode_lean_ms_per_token", "decode_lean_skipped", "decode_llamacpp_tokens_per_s",
              "decode_llamacpp_ms_per_token", "decode_llamacpp_skipped", "prefill_speedup", "decode_speedup",
              "decode_lean_speedup", "decode_lean_hf_speedup", "decode_llamacpp_speedup", "decode_llamacpp_hf_speedup",
              "prefill_speedup_iqr", "decode_speedup_iqr", "decode_lean_speedup_iqr", "decode_lean_hf_speedup_iqr",
              "decode_llamacpp_speedup_iqr", "decode_llamacpp_hf_speedup_iqr", "speed_rounds")

# the speed-ups a measurement holds (``speedup`` rebuilds each as a ``SpeedRatio``):
# prefill and decode through the Hugging Face forward against the fp32 teacher's; decode_lean, the lean
# decoder (``decode.StaticDecoder``) against the teacher's lean decode (like for like); decode_lean_hf, the
# lean decoder against the teacher's Hugging Face decode (what a deployment gains over the plain HF model);
# decode_llamacpp and decode_llamacpp_hf, the same two for llama.cpp on the exported GGUF (where installed)
SPEED_PHASES = ("prefill", "decode", "decode_lean", "decode_lean_hf", "decode_llamacpp", "decode_llamacpp_hf")


def measure_speed(model: nn.Module, profile: Profile, against: nn.Module | None = None, lean: bool = True) -> dict:
    """Prefill tokens/s, decode tokens/s and ms/token of one model, at the profile's recipe sizes.

    Prefill is timed on ``profile.recipe_latency_batch`` sequences of ``latency_seq`` tokens (a recipe
    times every step, and the claims table six models in up to three engines every round: the laptop profile
    uses 4, half the lessons' batch), decode on ``recipe_decode_tokens`` new tokens at batch 1 (the laptop
    profile: 16, half the lessons' 32; on the AMD EPYC Combined's lean-vs-lean ratio read 6.6x at 16 tokens and
    6.4x at 32, within this VM's run-to-run spread); the median of ``repeats`` runs after a warm-up.
    With ``lean``, decode is also timed through the lean decoder (``decode_lean_tokens_per_s``; a model
    it does not serve has ``decode_lean_skipped``, the reason). With ``against`` (the teacher), both
    models are timed round-robin in the same rounds, and the result also holds the speed-ups over it
    (``SPEED_PHASES``): ``<phase>_speedup`` (the median of the per-round ratios), its interquartile range
    ``<phase>_speedup_iqr`` and ``speed_rounds`` (``speedup`` rebuilds the ``SpeedRatio``).
    """
    return measure_speeds({"model": model}, profile, against=against, lean=lean)["model"]


def measure_speeds(models: dict[str, nn.Module], profile: Profile, against: nn.Module | None = None,
                   lean: bool = True, llama_cpp: bool = False, tokenizer=None) -> dict[str, dict]:
    """``measure_speed`` of several models at once, all timed in the same rounds (and ``against`` once per
    round, not once per model): ``{name: speed metrics}``, plus ``"__against__"``, the baseline's own speeds.

    With ``llama_cpp`` (and ``llama-cpp-python`` installed), every model ``export.to_gguf`` can write (the
    teacher as F32, int4 as Q4_1, int8 as Q8_0) is exported to a temporary GGUF file (``tokenizer`` for a
    vocabulary that is not the teacher's) and decoded by llama.cpp in the same rounds
    (``decode_llamacpp_*``); a model it cannot run says why in ``decode_llamacpp_skipped``, and so does
    every model when llama-cpp-python is missing.
    """
    if "__against__" in models:
        raise ValueError("a model named '__against__'; allowed: any other name")
    timed = dict(models) if against is None else {"__against__": against, **models}
    with tempfile.TemporaryDirectory(prefix="distill_lab-gguf-") as tmp:
        gguf, skipped = _export_for_llamacpp(timed, tokenizer, Path(tmp)) if llama_cpp else ({}, {})
        rows = compare_speed(timed, batch=profile.recipe_latency_batch, seq=profile.latency_seq,
                             decode_tokens=profile.recipe_decode_tokens, repeats=profile.repeats,
                             baseline=None if against is None else "__against__", lean=lean, gguf=gguf)
    for name, why in skipped.items():
        rows[name]["decode_llamacpp_skipped"] = why
    out = {}
    for name, row in rows.items():
        metrics = {k: row[k] for k in SPEED_KEYS if k in row and not k.endswith("_speedup")}
        if against is not None and name != "__against__":
            for phase in SPEED_PHASES:
                r = row.get(f"{phase}_speedup")
                if r is not None:
                    metrics[f"{phase}_speedup"], metrics[f"{phase}_speedup_iqr"] = r.median, [r.low, r.high]
            metrics["speed_rounds"] = row["prefill_speedup"].rounds
        out[name] = metrics
    return out


def _export_for_llamacpp(models: dict[str, nn.Module], tokenizer, folder: Path) -> tuple[dict, dict]:
    """``({name: GGUF path}, {name: why not})``: each model written by ``export.to_gguf`` into ``folder``."""
    if not llamacpp.available():
        return {}, {name: llamacpp.MISSING for name in models}
    paths, skipped = {}, {}
    for i, (name, model) in enumerate(models.items()):
        try:
            to_gguf(model, tokenizer, folder / f"model{i}.gguf")
        except ValueError as e:  # a family, layer kind or tokenizer GGUF has no mapping for
            skipped[name] = str(e).splitlines()[0]
            continue
        paths[name] = folder / f"model{i}.gguf"
    return paths, skipped


def speedup(metrics: dict, phase: str) -> SpeedRatio | None:
    """The ``SpeedRatio`` of ``phase`` (one of ``SPEED_PHASES``) in a step's metrics (one round when unpaired);
    None when the measurement has no such speed-up (a model the lean decoder does not serve)."""
    if phase not in SPEED_PHASES:
        raise ValueError(f"phase={phase!r}; allowed: {', '.join(map(repr, SPEED_PHASES))}")
    median = metrics.get(f"{phase}_speedup")
    if median is None:
        return None
    low, high = metrics.get(f"{phase}_speedup_iqr") or (median, median)
    return SpeedRatio(median, low, high, metrics.get("speed_rounds", 1) if f"{phase}_speedup_iqr" in metrics else 1)


def measure(model: nn.Module, windows: dict[str, torch.Tensor], profile: Profile,
            folder: str | Path | None = None, progress: bool = False, against: nn.Module | None = None,
            speed: bool = True) -> dict:
    """Perplexity on each window set, size on disk, parameters, prefill and decode speed of one model
    (with ``against``, timed in the same rounds as it: see ``measure_speed``; without ``speed``, not timed)."""

    metrics = {}
    for name, w in windows.items():
        metrics[f"ppl_{name}"] = perplexity(model, w, batch_size=profile.batch_size, progress=progress)
        metrics[f"eval_windows_{name}"] = len(w)  # how many test windows the perplexity is over
    metrics["size_bytes"] = weights_bytes(folder if folder is not None else model)
    metrics["params"] = logical_parameters(model)
    if speed:
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
    pairs = {"prefill": ("prefill", "prefill"), "decode": ("decode", "decode"),
             "decode_lean": ("decode_lean", "decode_lean"), "decode_lean_hf": ("decode_lean", "decode"),
             "decode_llamacpp": ("decode_llamacpp", "decode_llamacpp"),
             "decode_llamacpp_hf": ("decode_llamacpp", "decode")}
    for phase, (mine, theirs) in pairs.items():  # a speed-up timed in the same rounds as the teacher stands
        if f"{phase}_speedup_iqr" in metrics:
            continue
        if f"{mine}_tokens_per_s" in metrics and f"{theirs}_tokens_per_s" in base:
            out[f"{phase}_speedup"] = metrics[f"{mine}_tokens_per_s"] / base[f"{theirs}_tokens_per_s"]
    return out
