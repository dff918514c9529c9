"""Quantized teacher vs fp32 in one run: prefill at batch 8 x 256, decode at batch 1, size, ratios.

    python benchmarks/quantization.py [--threads 2] [--ppl-windows 8] [--check]
    python benchmarks/quantization.py --w8a8-only [--processes 5] [--check]

Targets from the course (2 CPU cores): W8A8 forward at least 2x faster than fp32 at 8 x 256,
INT4 (g64) decode at batch 1 at least 1.5x faster than fp32 decode. ``--check`` exits 1 when a
target is missed (timings depend on what else runs on the machine: run it on an idle one).

The W8A8 layer is also timed against the raw kernel it wraps (``torch._int_mm``) in several
fresh processes (issue 18: it used to be 1.8x in one process and 5x in another): in each
process, pairs of (raw, layer) calls alternate and the median pair ratio is kept; the target is
max over processes <= 1.5x (issue 17 aims for 1.3x).

torchao's ``Int8DynamicActivationInt8WeightConfig`` is measured beside ours when torchao is
installed (``pip install 'distill_lab[compare]'``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distill_lab as dl  # noqa: E402
from distill_lab.quantization import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,  # noqa: E402
                                      quantize_, saved_size_bytes)
from distill_lab.quantization.modules import Int8DynamicLinear  # noqa: E402
from distill_lab.timing import timed  # noqa: E402
from distill_lab.speed.quantization import format_kernel_table, kernel_benchmark  # noqa: E402


W8A8_SHAPE = (2048, 576, 1536)  # 8 x 256 tokens through gate/up_proj
W8A8_LIMIT = 1.5  # issue 18: the layer within 1.5x of the raw kernel in every process
W8A8_AIM = 1.3  # issue 17


def w8a8_worker(threads: int, pairs: int = 40) -> dict:
    """In this process: (raw ``_int_mm``, ``Int8DynamicLinear``) pairs on W8A8_SHAPE, alternating."""
    torch.set_num_threads(threads)
    m, k, n = W8A8_SHAPE
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    layer = Int8DynamicLinear.from_float(lin)
    x = torch.randn(m, k, generator=gen)
    xq, _ = layer.quantize_input(x)
    wt = layer.weight_int8.t()
    raw, lay = [], []
    with torch.no_grad():
        for i in range(pairs + 3):
            t_raw = timed(lambda: torch._int_mm(xq, wt))  # (M, N) int32, its own fresh output like the layer's
            t_layer = timed(lambda: layer(x))
            if i >= 3:
                raw.append(t_raw)
                lay.append(t_layer)
    ratios = [b / a for a, b in zip(raw, lay)]
    return {"raw_ms": 1e3 * statistics.median(raw), "layer_ms": 1e3 * statistics.median(lay),
            "raw_min_ms": 1e3 * min(raw), "layer_min_ms": 1e3 * min(lay), "ratio": statistics.median(ratios)}


def w8a8_processes(processes: int, threads: int, pairs: int = 40) -> list[dict]:
    """Run ``w8a8_worker`` in ``processes`` fresh interpreters; one dict per process."""
    rows = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, __file__, "--w8a8-worker", "--threads", str(threads),
                              "--pairs", str(pairs)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def report_w8a8(rows: list[dict]) -> bool:
    """Print the per-process table and min/median/max of the layer/raw ratio; True when max <= W8A8_LIMIT."""
    m, k, n = W8A8_SHAPE
    print(f"\nW8A8 Linear {m} x {k} -> {n} vs raw torch._int_mm, {len(rows)} fresh processes "
          "(median over alternating pairs):")
    print(f"{'process':>8s}{'raw ms':>9s}{'layer ms':>10s}{'layer/raw':>11s}")
    for i, r in enumerate(rows):
        print(f"{i + 1:8d}{r['raw_ms']:9.2f}{r['layer_ms']:10.2f}{r['ratio']:10.2f}x")
    ratios = sorted(r["ratio"] for r in rows)
    ok = ratios[-1] <= W8A8_LIMIT
    print(f"layer/raw min {ratios[0]:.2f}x, median {statistics.median(ratios):.2f}x, max {ratios[-1]:.2f}x "
          f"(target max <= {W8A8_LIMIT}x: {'PASS' if ok else 'MISS'}; aim <= {W8A8_AIM}x)")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=8, help="test windows for perplexity (0: skip)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a speed target is missed")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes for the W8A8 layer/raw ratio")
    parser.add_argument("--w8a8-only", action="store_true", help="only the W8A8 layer vs raw kernel check")
    parser.add_argument("--pairs", type=int, default=40, help="(raw, layer) pairs timed in each fresh process")
    parser.add_argument("--w8a8-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.w8a8_worker:
        print(json.dumps(w8a8_worker(args.threads, args.pairs)))
        return
    torch.set_num_threads(args.threads)
    env = dl.environment_info()
    print(f"torch {env['torch']} on {env['device']}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")

    ok_w8a8 = report_w8a8(w8a8_processes(args.processes, args.threads, args.pairs))
    if args.w8a8_only:
        sys.exit(0 if ok_w8a8 or not args.check else 1)

    print("\nOne Linear at the teacher's shapes (median of repeats):")
    print(format_kernel_table(kernel_benchmark()))

    model, tok = dl.load_teacher(device="cpu")
    windows = dl.corpus_windows("pydoc", "test", tok, args.seq)[:args.ppl_windows] if args.ppl_windows else None
    variants = {"fp32": None, "bf16": "bf16", "INT8 weight-only": Int8WeightOnlyConfig(),
                "W8A8": Int8DynamicConfig(), "INT4 g64": Int4WeightOnlyConfig(group_size=64)}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_ as ao_quantize_
        variants["torchao W8A8"] = ("torchao", Int8DynamicActivationInt8WeightConfig, ao_quantize_)
    except ImportError:
        print("\ntorchao is not installed: the torchao Int8DynamicActivationInt8WeightConfig comparison is "
              "skipped (pip install 'distill_lab[compare]' to add it).")

    results = {}
    for name, config in variants.items():
        m = copy.deepcopy(model)
        if config == "bf16":
            m = m.to(torch.bfloat16)
        elif isinstance(config, tuple):
            _, ao_config, ao_quantize_ = config
            ao_quantize_(m, ao_config())
        elif config is not None:
            quantize_(m, config)
        lat = dl.latency(m, batch=args.batch, seq=args.seq, decode_tokens=args.decode_tokens,
                         repeats=args.repeats)
        row = {"prefill_tok_s": lat["prefill_tokens_per_s"], "decode_tok_s": lat["decode_tokens_per_s"]}
        if windows is not None:
            row["ppl"] = dl.perplexity(m, windows, progress=False)
        if not isinstance(config, tuple):
            row["disk_MB"] = saved_size_bytes(m) / 1e6
        results[name] = row
        print(f"  measured {name}: {row}", flush=True)
        del m
        gc.collect()

    base = results["fp32"]
    print(f"\nTeacher, prefill batch {args.batch} x {args.seq}, decode batch 1 ({args.decode_tokens} tokens), "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':18s}{'disk MB':>9s}{'prefill tok/s':>15s}{'x fp32':>8s}{'decode tok/s':>14s}{'x fp32':>8s}"
          + (f"{'ppl':>8s}{'Δppl':>8s}" if windows is not None else ""))
    for name, r in results.items():
        line = (f"{name:18s}{r.get('disk_MB', float('nan')):9.1f}{r['prefill_tok_s']:15.0f}"
                f"{r['prefill_tok_s'] / base['prefill_tok_s']:8.2f}{r['decode_tok_s']:14.1f}"
                f"{r['decode_tok_s'] / base['decode_tok_s']:8.2f}")
        if windows is not None:
            line += f"{r['ppl']:8.2f}{100 * (r['ppl'] / base['ppl'] - 1):+7.1f}%"
        print(line)
    w8a8 = results["W8A8"]["prefill_tok_s"] / base["prefill_tok_s"]
    int4 = results["INT4 g64"]["decode_tok_s"] / base["decode_tok_s"]
    ok1, ok2 = w8a8 >= 2.0, int4 >= 1.5
    print(f"\nW8A8 prefill speed-up {w8a8:.2f}x (target >= 2x): {'PASS' if ok1 else 'MISS'}")
    print(f"INT4 decode speed-up {int4:.2f}x (target >= 1.5x): {'PASS' if ok2 else 'MISS'}")
    if "torchao W8A8" in results and windows is not None:
        ao = results["torchao W8A8"]
        print(f"ours vs torchao W8A8: prefill {w8a8:.2f}x vs {ao['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, "
              f"ppl {results['W8A8']['ppl']:.2f} vs {ao['ppl']:.2f}")
    if args.check and not (ok1 and ok2 and ok_w8a8):
        sys.exit(1)


if __name__ == "__main__":
    main()
