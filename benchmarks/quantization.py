"""Quantized teacher vs fp32 in one run: prefill at batch 8 x 256, decode at batch 1, size, ratios.

    python benchmarks/quantization.py [--threads 2] [--ppl-windows 8] [--check]

Targets from the course (2 CPU cores): W8A8 forward at least 2x faster than fp32 at 8 x 256,
INT4 (g64) decode at batch 1 at least 1.5x faster than fp32 decode. ``--check`` exits 1 when a
target is missed (timings depend on what else runs on the machine: run it on an idle one).
torchao's ``Int8DynamicActivationInt8WeightConfig`` is measured beside ours when torchao is
installed (``pip install 'distill_lab[compare]'``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distill_lab as dl  # noqa: E402
from distill_lab.quantize import (Int4WeightOnly, Int8Dynamic, Int8WeightOnly, format_kernel_table,  # noqa: E402
                                  kernel_benchmark, quantize_, saved_size_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=8, help="test windows for perplexity (0: skip)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a speed target is missed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = dl.environment_info()
    print(f"torch {env['torch']} on {env['device']}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")

    print("\nOne Linear at the teacher's shapes (median of repeats):")
    print(format_kernel_table(kernel_benchmark()))

    model, tok = dl.load_teacher(device="cpu")
    windows = dl.corpus_windows("pydoc", "test", tok, args.seq)[:args.ppl_windows] if args.ppl_windows else None
    variants = {"fp32": None, "bf16": "bf16", "INT8 weight-only": Int8WeightOnly(), "W8A8": Int8Dynamic(),
                "INT4 g64": Int4WeightOnly(group_size=64)}
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
    if args.check and not (ok1 and ok2):
        sys.exit(1)


if __name__ == "__main__":
    main()
