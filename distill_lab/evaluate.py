"""Measure a language model: perplexity, generations, latency, memory, size, and a result record.

Perplexity is ``exp(mean token negative log-likelihood)`` over the scored tokens (Jelinek et
al., 1977). Numbers from different harnesses disagree because they choose a different window
(context length), stride (how much context each scored token sees), and unit (per token of
*this* tokenizer vs per word or byte); see notebook 00. Latency follows the usual LLM split:
prefill (prompt processing, compute-bound) and decode (one token at a time, memory-bound).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._fs import atomic_write_text
from ._hf import quiet_transformers
from .runtime import autocast as _autocast
from .runtime import device_of as _device_of
from .tensors import unique_tensors
from .timing import timed


@torch.inference_mode()
def token_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, bf16: bool = False,
              context: int = 0, progress: bool = True) -> tuple[float, int]:
    """Return the summed next-token negative log-likelihood and the number of scored tokens."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D (N, T), got shape {tuple(windows.shape)}")
    T = windows.shape[1]
    if not 0 <= context < T - 1:
        raise ValueError(f"context={context}; allowed: 0 <= context < window - 1 ({T - 1})")
    device = _device_of(model)
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", leave=False, disable=not progress):
        batch = batch.to(device)  # (B, T)
        with _autocast(device, bf16):
            logits = model(batch).logits  # (B, T, V)
        # token t+1 is predicted from position t; the first `context` targets are conditioning only
        logits = logits[:, context:-1].float()  # (B, T-1-context, V)
        targets = batch[:, context + 1:]  # (B, T-1-context)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += targets.numel()
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, bf16: bool = False,
               context: int = 0, progress: bool = True) -> float:
    """Token-level perplexity over (N, T) windows; with overlapping windows set ``context = T - stride``."""
    total, count = token_nll(model, windows, batch_size, bf16, context, progress)
    return math.exp(total / count)


def perplexity_units(model: nn.Module, tokenizer, windows: torch.Tensor, batch_size: int = 8,
                     bf16: bool = False, context: int = 0, progress: bool = True) -> dict[str, float]:
    """The same likelihood in three units: per-token perplexity, per-word perplexity and bits per byte."""
    total, count = token_nll(model, windows, batch_size, bf16, context, progress)
    scored = [tokenizer.decode(w[context + 1:].tolist()) for w in windows]  # the scored text
    words = sum(len(text.split()) for text in scored)
    nbytes = sum(len(text.encode("utf-8")) for text in scored)
    return {"token_ppl": math.exp(total / count), "word_ppl": math.exp(total / words),
            "bits_per_byte": total / (math.log(2) * nbytes), "tokens": count, "words": words,
            "bytes": nbytes}


@torch.inference_mode()
def generate_continuations(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                           temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[dict]:
    """Continue each prompt (greedy when ``temperature == 0``): ``[{"text", "ids"}]``, new tokens only.

    ``ids`` are the generated token ids (fewer than ``max_new_tokens`` when the model stopped at EOS),
    the input of :func:`repeated_ngram_share`.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; allowed: >= 0 (0 means greedy)")
    device = _device_of(model)
    outputs = []
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        new = out[0, ids.shape[1]:].tolist()
        outputs.append({"text": tokenizer.decode(new, skip_special_tokens=True), "ids": new})
    return outputs


def generate_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                     temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[str]:
    """Generate a continuation for each prompt (greedy when ``temperature == 0``); returns new text only."""
    return [g["text"] for g in generate_continuations(model, tokenizer, prompts, max_new_tokens,
                                                      temperature, seed, chat)]


def repeated_ngram_share(ids, n: int = 4) -> float:
    """Share of the ``n``-grams of a generated token sequence that already occurred earlier in it.

    0 for text that never repeats a run of ``n`` tokens; near 1 for a loop ("the value of the value
    of ..."). A sequence shorter than ``n + 1`` tokens has nothing to repeat and scores 0, so report
    the number of tokens next to it (a model that stops at once is not fluent either).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}; allowed: an int >= 1")
    ids = [int(i) for i in ids]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


@torch.inference_mode()
def next_token_logits(model: nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Return the model's logits for the token that follows ``prompt``, shape (V,)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    return model(ids.to(_device_of(model))).logits[0, -1].float().cpu()  # (V,)


def timing_prompts(vocab: int, batch: int, seq: int, prompt_len: int = 32, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids for speed tests: a (batch, seq) prefill prompt and a (1, prompt_len) decode prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, seq), generator=g).to(device)  # (B, T)
    short = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)  # (1, P)
    return prompt, short


@torch.inference_mode()
def latency(model: nn.Module, batch: int = 8, seq: int = 256, decode_tokens: int = 32,
            repeats: int = 3, warmup: int = 1, vocab_size: int | None = None,
            bf16: bool = False, prompt_len: int = 32, seed: int = 0) -> dict[str, float]:
    """Median prefill tokens/s at (batch, seq) and decode tokens/s at batch 1 with a KV cache."""
    device = _device_of(model)
    vocab = vocab_size or model.config.vocab_size
    prompt, short = timing_prompts(vocab, batch, seq, prompt_len, seed, device)  # (B, T), (1, P)

    def prefill():
        with _autocast(device, bf16):
            model(prompt, use_cache=False)

    def decode():
        with _autocast(device, bf16, phase="decode"):
            out = model(short, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # (1, 1)
            state = {"cache": cache, "token": token}

            def steps():
                for _ in range(decode_tokens):
                    out = model(state["token"], cache=state["cache"], use_cache=True)
                    state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)

            return timed(steps, device)

    for _ in range(warmup):
        prefill()
        decode()
    prefill_times = [timed(prefill, device) for _ in range(repeats)]
    decode_times = [decode() for _ in range(repeats)]
    p, d = statistics.median(prefill_times), statistics.median(decode_times)
    return {"prefill_tokens_per_s": batch * seq / p, "prefill_s": p,
            "decode_tokens_per_s": decode_tokens / d, "decode_ms_per_token": 1000 * d / decode_tokens,
            "batch": batch, "seq": seq, "decode_tokens": decode_tokens, "repeats": repeats}


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
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device)
    _reset_rss_peak()
    result = fn()
    return result, _rss_peak_bytes()


def folder_size_bytes(folder: str | Path) -> int:
    """Return the total size of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def model_size_bytes(model: nn.Module, on_disk: bool = False) -> int:
    """Bytes of unique parameters and buffers in memory, or of the safetensors weights ``save_pretrained`` writes."""
    if on_disk:
        with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
    return sum(t.numel() * t.element_size() for t in unique_tensors([*model.parameters(), *model.buffers()]))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    """Return the CPU model name (from /proc/cpuinfo on Linux), else the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict:
    """Describe where a number was measured: versions, device, CPU threads, git commit."""
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{_cpu_name()} (CPU, {os.cpu_count()} cores)"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True),
            "device": device, "cpu_threads": torch.get_num_threads(),
            "git_commit": _git_commit(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass
class Result:
    """A measured result: a named set of metrics plus the profile, seed and environment."""

    name: str  # what was measured, e.g. "00_baseline"
    metrics: dict  # metric name -> number (or nested dict of numbers)
    profile: str = ""  # profile the run used
    seed: int = 0  # seed the run used
    env: dict = field(default_factory=environment_info)  # versions, device, commit

    def to_json(self) -> str:
        """Serialize to a JSON string."""
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON (atomically) and return the path."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        """Read a record written by ``save``."""
        return cls(**json.loads(Path(path).read_text()))


REPORT_ENV = "DISTILL_LAB_REPORT_DIR"


def record(result: Result) -> Path | None:
    """Save a notebook's result into ``$DISTILL_LAB_REPORT_DIR/results/`` when ``make run`` set it."""
    folder = os.environ.get(REPORT_ENV)
    if not folder:
        return None
    return result.save(Path(folder) / "results" / f"{result.name}.json")
