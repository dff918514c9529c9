"""What a language model costs to run: prefill and decode speed, and peak memory.

Latency follows the usual LLM split: prefill (prompt processing, compute-bound) and decode (one token
at a time, memory-bound). ``phase_probes`` is the one prefill/decode harness: ``latency`` times one
model with it, ``compare_speed`` several models interleaved, with ``SpeedRatio``s against a baseline, and with
``lean=True`` also the decode of ``decode.StaticDecoder`` (the lean engine a deployment uses) and with
``gguf`` that of llama.cpp (``llamacpp``) on each model's exported GGUF file. Bytes in memory
and on disk have their own homes: ``tensors.memory_bytes`` and ``serialization.weights_bytes``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..decode import StaticDecoder, lean_decode_supported
from ..llamacpp import llamacpp_decode_probe
from ..profiles import default_device
from ..runtime import autocast, device_of
from ..timing import MIN_ROUNDS, SpeedRatio, interleaved_medians, interleaved_times, medians, timed

__all__ = ["compare_speed", "latency", "lean_decode_probe", "peak_memory", "phase_probes", "speed_row",
           "timing_prompts"]


def timing_prompts(vocab: int, batch: int, seq: int, prompt_len: int = 32, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids for speed tests: a (batch, seq) prefill prompt and a (1, prompt_len) decode prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, seq), generator=g).to(device)  # (B, T)
    short = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)  # (1, P)
    return prompt, short


def phase_probes(model: nn.Module, batch: int = 8, seq: int = 256, decode_tokens: int = 32,
                 bf16: bool | str = False, prompt_len: int = 32, seed: int = 0,
                 vocab_size: int | None = None) -> dict[str, Callable[[], float]]:
    """``{"prefill": probe, "decode": probe}``: each call returns the seconds of one timed run.

    Prefill is one forward over (batch, seq) random tokens without a cache; decode is ``decode_tokens``
    greedy steps at batch 1 with the KV cache, after an untimed ``prompt_len``-token prompt.
    """
    device = device_of(model)
    vocab = vocab_size or model.config.vocab_size
    prompt, short = timing_prompts(vocab, batch, seq, prompt_len, seed, device)  # (B, T), (1, P)

    @torch.inference_mode()
    def prefill() -> float:
        def run():
            with autocast(device, bf16):
                model(prompt, use_cache=False)
        return timed(run, device)

    @torch.inference_mode()
    def decode() -> float:
        with autocast(device, bf16, phase="decode"):
            out = model(short, use_cache=True)
            state = {"cache": out.cache, "token": out.logits[:, -1:].argmax(-1)}  # token (1, 1)

            def steps():
                for _ in range(decode_tokens):
                    out = model(state["token"], cache=state["cache"], use_cache=True)
                    state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)

            return timed(steps, device)

    return {"prefill": prefill, "decode": decode}


def lean_decode_probe(model: nn.Module, decode_tokens: int = 32, prompt_len: int = 32,
                      seed: int = 0, batch: int = 8, seq: int = 256) -> Callable[[], float] | None:
    """A probe timing ``decode_tokens`` greedy steps of ``decode.StaticDecoder`` after the same untimed
    ``prompt_len``-token prompt as ``phase_probes``' decode (drawn after its (``batch``, ``seq``) prefill
    prompt, as there); None for a model the lean decoder does not serve.

    Build it after the model's last change (the decoder holds fused copies of some weights).
    """
    reason = lean_decode_supported(model)
    if reason is not None:
        return None
    _, short = timing_prompts(model.config.vocab_size, batch, seq, prompt_len, seed, device_of(model))  # (1, P)
    decoder = StaticDecoder(model, max_len=prompt_len + decode_tokens + 1)
    return lambda: decoder.decode_s(short, decode_tokens)


def speed_row(prefill_s: float, decode_s: float, batch: int, seq: int, decode_tokens: int) -> dict[str, float]:
    """Tokens/s of one prefill of (batch, seq) taking ``prefill_s`` and ``decode_tokens`` steps taking ``decode_s``."""
    return {"prefill_tokens_per_s": batch * seq / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": decode_tokens / decode_s, "decode_ms_per_token": 1000 * decode_s / decode_tokens}


def latency(model: nn.Module, batch: int = 8, seq: int = 256, decode_tokens: int = 32,
            repeats: int = 3, warmup: int = 1, vocab_size: int | None = None,
            bf16: bool = False, prompt_len: int = 32, seed: int = 0) -> dict[str, float]:
    """Median prefill tokens/s at (batch, seq) and decode tokens/s at batch 1 with a KV cache."""
    probes = phase_probes(model, batch, seq, decode_tokens, bf16, prompt_len, seed, vocab_size)
    s = interleaved_medians(probes, repeats=repeats, warmup=warmup)
    return {**speed_row(s["prefill"], s["decode"], batch, seq, decode_tokens),
            "batch": batch, "seq": seq, "decode_tokens": decode_tokens, "repeats": repeats}


def compare_speed(models: dict[str, nn.Module], batch: int = 8, seq: int = 256, decode_tokens: int = 16,
                  repeats: int = MIN_ROUNDS, warmup: int = 1, bf16: bool | dict[str, bool] = False, seed: int = 0,
                  decode: bool = True, progress: bool = False, baseline: str | None = None,
                  lean: bool = False, gguf: dict[str, str | Path] | None = None) -> dict[str, dict]:
    """Prefill and decode tokens/s of several models, timed interleaved (A, B, C, A, B, C, ...), medians.

    Interleaving makes the ratios fair on a busy machine: a slow moment hits every model of that round alike.
    Each model is timed by ``evaluate.phase_probes`` (the harness ``evaluate.latency`` uses): prefill is
    one forward over (batch, seq) random tokens; decode is ``decode_tokens`` greedy steps at batch 1
    after a 32-token prompt, with the KV cache. ``bf16`` is one flag or one per model name (the same model
    can be timed twice, fp32 and bf16 autocast). With ``baseline`` (a name of ``models``), every row also
    holds ``prefill_speedup`` and ``decode_speedup``: ``SpeedRatio``s against it, round by round.
    With decode timed, every row also holds ``prefill_per_decode_token``: how many times more tokens/s
    the model's prefill gives than its decode, as a ``SpeedRatio`` of the two phases' per-token times in the
    same rounds.
    With ``lean`` (and ``decode``), each model the lean decoder serves is also decoded by ``decode.StaticDecoder``
    in the same rounds (same prompt, same number of tokens): ``decode_lean_tokens_per_s``, and with
    ``baseline`` the like-for-like ``decode_lean_speedup`` (lean against the baseline's lean decode) and
    ``decode_lean_hf_speedup`` (lean against the baseline's Hugging Face decode: the gain a deployment sees).
    A row the lean decoder does not serve says why in ``decode_lean_skipped``.
    With ``gguf`` ({model name: its GGUF file, as ``export.to_gguf`` wrote it}; needs ``llama-cpp-python``), those
    models are also decoded by llama.cpp in the same rounds, with the same prompt and number of tokens, on
    ``torch.get_num_threads()`` threads: ``decode_llamacpp_tokens_per_s``, and with ``baseline`` (when it has a
    GGUF too) ``decode_llamacpp_speedup`` (llama.cpp against the baseline's llama.cpp decode, like for like) and
    ``decode_llamacpp_hf_speedup`` (against the baseline's Hugging Face decode).
    """
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline={baseline!r}; allowed: one of {list(models)}")
    if lean and not decode:
        raise ValueError("lean=True with decode=False; allowed: lean decode is timed only with decode=True")
    gguf = dict(gguf or {})
    if gguf and not decode:
        raise ValueError("gguf with decode=False; allowed: llama.cpp decode is timed only with decode=True")
    unknown = sorted(set(gguf) - set(models))
    if unknown:
        raise ValueError(f"gguf names {unknown}; allowed: names of models {list(models)}")
    flags = bf16 if isinstance(bf16, dict) else {name: bf16 for name in models}
    probes = {}
    for name, model in models.items():
        phases = phase_probes(model, batch, seq, decode_tokens, flags.get(name, False), prompt_len=32, seed=seed)
        probes[(name, "prefill")] = phases["prefill"]
        if decode:
            probes[(name, "decode")] = phases["decode"]
        if lean and lean_decode_supported(model) is None:
            probes[(name, "decode_lean")] = lean_decode_probe(model, decode_tokens, 32, seed, batch, seq)
        if name in gguf:
            _, short = timing_prompts(model.config.vocab_size, batch, seq, 32, seed)  # (1, 32): the HF decode's prompt
            probes[(name, "decode_llamacpp")] = llamacpp_decode_probe(gguf[name], short, decode_tokens)
    try:
        times = interleaved_times(probes, repeats=repeats, warmup=warmup, progress=progress)
    finally:
        for probe in probes.values():  # llama.cpp engines hold their file open: free them now
            getattr(probe, "close", lambda: None)()
    med = medians(times)
    out = {}
    for name in models:
        row = speed_row(med[name, "prefill"], med.get((name, "decode"), float("nan")), batch, seq, decode_tokens)
        if decode:
            row["prefill_per_decode_token"] = SpeedRatio.of_rounds(
                [t / decode_tokens for t in times[name, "decode"]],
                [t / (batch * seq) for t in times[name, "prefill"]])
        if baseline is not None:
            for phase in ("prefill", "decode") if decode else ("prefill",):
                row[f"{phase}_speedup"] = SpeedRatio.of_rounds(times[baseline, phase], times[name, phase])
        if lean:
            _lean_columns(row, name, models[name], times, baseline, decode_tokens)
        if name in gguf:
            _engine_columns(row, "decode_llamacpp", name, times, baseline, decode_tokens)
        out[name] = row
    return out


def _lean_columns(row: dict, name: str, model: nn.Module, times: dict, baseline: str | None,
                  decode_tokens: int) -> None:
    """Add the lean decoder's columns of ``compare_speed`` to ``row`` (or why it has none)."""
    if (name, "decode_lean") not in times:
        row["decode_lean_skipped"] = lean_decode_supported(model)
        return
    _engine_columns(row, "decode_lean", name, times, baseline, decode_tokens)


def _engine_columns(row: dict, phase: str, name: str, times: dict, baseline: str | None, decode_tokens: int) -> None:
    """A second decode engine's columns: ``<phase>_tokens_per_s``, ``_ms_per_token``, and against ``baseline``
    ``<phase>_speedup`` (its decode in the same engine) and ``<phase>_hf_speedup`` (its HF decode)."""
    s = medians({phase: times[name, phase]})[phase]
    row[f"{phase}_tokens_per_s"] = decode_tokens / s
    row[f"{phase}_ms_per_token"] = 1000 * s / decode_tokens
    if baseline is None:
        return
    row[f"{phase}_hf_speedup"] = SpeedRatio.of_rounds(times[baseline, "decode"], times[name, phase])
    if (baseline, phase) in times:
        row[f"{phase}_speedup"] = SpeedRatio.of_rounds(times[baseline, phase], times[name, phase])


def _rss_peak_bytes() -> int:
    """Return the process's peak resident set size (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs``); return True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device: str | torch.device | None = None) -> tuple[object, int]:
    """Run ``fn()`` and return ``(result, peak bytes)``: CUDA allocator peak, or process RSS peak on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device)
    _reset_rss_peak()
    result = fn()
    return result, _rss_peak_bytes()
