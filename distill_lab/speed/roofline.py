"""How fast can batch-1 decode be here? This machine's memory bandwidth, and where a decode step's time goes.

* ``memory_bandwidth()``: bytes per second this machine streams from memory (a sum over a buffer far larger
  than the caches, the median of alternating rounds). Decode at batch 1 reads every weight once per token,
  so ``bandwidth / bytes read per token`` is an upper bound on tokens/s: the *memory roofline*
  (Williams, Waterman and Patterson, 2009, "Roofline: an insightful visual performance model").
* ``decode_time_shares(model)``: a ``torch.profiler`` table of a few decode steps, and the share of their
  time spent in matrix products. A faster matmul kernel speeds up only that share: Amdahl's law
  (Amdahl, 1967) turns a kernel speed-up into a model speed-up.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..runtime import device_of
from ..timing import median_seconds

__all__ = ["MATMUL_OPS", "decode_time_shares", "memory_bandwidth"]

# the ops that multiply by a weight matrix, in fp32, bf16, int8 and int4 (one decode step of any course model)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_int_mm",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm")


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second read from memory by ``x.sum()`` over an fp32 buffer of ``mib`` MiB (median of ``repeats``).

    The buffer is far larger than any CPU cache, so every byte comes from DRAM; the sum uses all of torch's
    threads, as a decode step does. A lower bound of what the machine can stream (a tuned copy kernel may
    read faster), which is what a model's decode actually gets.
    """
    if mib < 64:
        raise ValueError(f"mib={mib}; allowed: >= 64 (smaller buffers fit in a server CPU's cache)")
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    seconds = median_seconds(lambda: x.sum(), repeats=repeats, warmup=1)
    return x.numel() * 4 / seconds


@contextmanager
def _quiet_native_stderr():
    """Silence what C++ code writes to file descriptor 2 (the profiler's start/stop lines) for the block."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no real fd 2 (some embedded interpreters): nothing to silence
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@torch.inference_mode()
def decode_time_shares(model: nn.Module, steps: int = 8, prompt_len: int = 32, seed: int = 0) -> dict:
    """Profile ``steps`` greedy decode steps at batch 1 with the KV cache: where does the time go?

    Returns ``{"matmul_share", "total_ms", "rows"}``: the share of the steps' CPU time (self time of every
    op) spent in ``MATMUL_OPS``, the total in ms, and the ten most expensive ops as ``(name, ms, calls)``.
    """
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)  # (1, P)
    out = model(ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token (1, 1)
    model(token, cache=cache, use_cache=True)  # one untimed step: first-call allocation
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    rows = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events), key=lambda r: -r[1])[:10]
    return {"matmul_share": matmul / total if total else float("nan"), "total_ms": total / 1e3, "rows": rows,
            "steps": steps}
