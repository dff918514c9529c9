"""Quantized teacher vs fp32 in one run, with every kernel path chosen on this CPU (issue 27).

    python benchmarks/quantization.py [--threads 2] [--rounds 5] [--ppl-windows 8] [--check]
    python benchmarks/quantization.py --w8a8-only [--processes 3] [--check]

Three parts, all timed on this machine and printed with its CPU's name:

1. The W8A8 layer against the raw kernel it wraps (``torch._int_mm``) at 2048 x 576 -> 1536 and
   256 x 576 -> 1536, in several fresh processes (issue 18: the ratio used to differ between
   processes): in each, pairs of (raw, layer) calls alternate and the median pair ratio is kept.
   Target: max over processes <= 1.5x at both shapes.
2. ``quantization.dispatch``'s measurement: every path of W8A8, INT8 weight-only and INT4 at decode
   (1 row) and prefill, its ratio to fp32 and to the raw kernel, and the path chosen per phase.
3. The teacher: fp32, bf16, INT8 weight-only, W8A8 and INT4 g64 at prefill 8 x 256 and decode
   batch 1, rounds alternating between the models (drift hits all alike), medians. Target: every
   quantized row at least 0.9x fp32 in both phases (no default may make a model slower).

``--check`` exits 1 when a target is missed (timings depend on what else runs: use an idle
machine). torchao's ``Int8DynamicActivationInt8WeightConfig`` is measured beside ours when torchao
is installed (``pip install 'distill_lab[compare]'``).
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
from distill_lab.hardware import cpu_model  # noqa: E402
from distill_lab.quantization import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,  # noqa: E402
                                      quantize_)
from distill_lab.quantization import dispatch  # noqa: E402
from distill_lab.quantization.modules import Int8DynamicLinear  # noqa: E402
from distill_lab.serialization import weights_bytes  # noqa: E402
from distill_lab.timing import timed  # noqa: E402

W8A8_SHAPES = ((2048, 576, 1536), (256, 576, 1536))  # 8 x 256 and 1 x 256 tokens through gate/up_proj
W8A8_LIMIT = 1.5  # issue 18 / 27: the layer within 1.5x of the raw kernel in every process
W8A8_AIM = 1.3  # issue 17
MIN_RATIO = 0.9  # issue 27: no quantized row slower than 0.9x fp32 at prefill or decode
FORMAT_OF = {"INT8 weight-only": "int8_weight_only", "W8A8": "w8a8", "INT4 g64": "int4"}


def w8a8_worker(threads: int, rows: int, pairs: int = 40) -> dict:
    """In this process: (raw ``_int_mm``, ``Int8DynamicLinear``) pairs at (rows, 576) -> 1536, alternating."""
    torch.set_num_threads(threads)
    _, k, n = W8A8_SHAPES[0]
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    layer = Int8DynamicLinear.from_float(lin)
    x = torch.randn(rows, k, generator=gen)
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
    return {"rows": rows, "raw_ms": 1e3 * statistics.median(raw), "layer_ms": 1e3 * statistics.median(lay),
            "path": dispatch.kernel_path("w8a8", rows), "ratio": statistics.median(ratios)}


def w8a8_processes(processes: int, threads: int, pairs: int = 40) -> list[dict]:
    """Run ``w8a8_worker`` at every W8A8 shape in ``processes`` fresh interpreters; one dict per (process, shape)."""
    rows = []
    for _ in range(processes):
        for m, _, _ in W8A8_SHAPES:
            out = subprocess.run([sys.executable, __file__, "--w8a8-worker", "--threads", str(threads),
                                  "--pairs", str(pairs), "--rows", str(m)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def report_w8a8(rows: list[dict]) -> bool:
    """Print the per-process table and the max layer/raw ratio per shape; True when every max <= W8A8_LIMIT."""
    print(f"\n1. W8A8 Linear (rows) x 576 -> 1536 vs raw torch._int_mm, fresh processes (median over alternating "
          "pairs):")
    print(f"{'rows':>6s}{'path':>9s}{'raw ms':>9s}{'layer ms':>10s}{'layer/raw':>11s}")
    for r in rows:
        print(f"{r['rows']:6d}{r['path']:>9s}{r['raw_ms']:9.2f}{r['layer_ms']:10.2f}{r['ratio']:10.2f}x")
    ok = True
    for m, _, _ in W8A8_SHAPES:
        ratios = sorted(r["ratio"] for r in rows if r["rows"] == m)
        good = ratios[-1] <= W8A8_LIMIT
        ok &= good
        print(f"{m} rows: layer/raw min {ratios[0]:.2f}x, median {statistics.median(ratios):.2f}x, max "
              f"{ratios[-1]:.2f}x (target max <= {W8A8_LIMIT}x: {'PASS' if good else 'MISS'}; aim <= {W8A8_AIM}x)")
    return ok


def time_models(models: dict, batch: int, seq: int, decode_tokens: int, rounds: int) -> dict:
    """{name: (prefill tok/s, decode tok/s)}: medians over ``rounds`` rounds that alternate between the models."""
    times = {name: ([], []) for name in models}
    for r in range(rounds + 1):  # round 0 warms every model up and is not counted
        for name, m in models.items():
            lat = dl.latency(m, batch=batch, seq=seq, decode_tokens=decode_tokens, repeats=1, warmup=0)
            if r:
                times[name][0].append(lat["prefill_tokens_per_s"])
                times[name][1].append(lat["decode_tokens_per_s"])
    return {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds alternating between the models")
    parser.add_argument("--ppl-windows", type=int, default=8, help="test windows for perplexity (0: skip)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a speed target is missed")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes for the W8A8 layer/raw ratio")
    parser.add_argument("--w8a8-only", action="store_true", help="only the W8A8 layer vs raw kernel check")
    parser.add_argument("--pairs", type=int, default=40, help="(raw, layer) pairs timed in each fresh process")
    parser.add_argument("--rows", type=int, default=W8A8_SHAPES[0][0], help=argparse.SUPPRESS)
    parser.add_argument("--w8a8-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.w8a8_worker:
        print(json.dumps(w8a8_worker(args.threads, args.rows, args.pairs)))
        return
    torch.set_num_threads(args.threads)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads{load}")

    kernels = dispatch.kernel_profile(refresh=True)  # measured once, before the workers read it
    ok_w8a8 = report_w8a8(w8a8_processes(args.processes, args.threads, args.pairs))
    if args.w8a8_only:
        sys.exit(0 if ok_w8a8 or not args.check else 1)

    print("\n2. Every kernel path, one Linear at the teacher's shapes (quantization.dispatch, measured now):")
    print(dispatch.format_kernel_profile(kernels))
    paths = dispatch.kernel_paths()

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

    models, extra = {}, {}
    for name, config in variants.items():
        m = copy.deepcopy(model)
        if config == "bf16":
            m = m.to(torch.bfloat16)
        elif isinstance(config, tuple):
            _, ao_config, ao_quantize_ = config
            ao_quantize_(m, ao_config())
        elif config is not None:
            summary = quantize_(m, config)
            print(f"  {name}: {summary}")
        row = {}
        if windows is not None:
            row["ppl"] = dl.perplexity(m, windows, progress=False)
        if not isinstance(config, tuple):
            row["disk_MB"] = weights_bytes(m) / 1e6
        models[name], extra[name] = m, row
        gc.collect()
    print(f"\n3. The teacher, prefill batch {args.batch} x {args.seq}, decode batch 1 ({args.decode_tokens} tokens), "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds alternating between the models:")
    speed = time_models(models, args.batch, args.seq, args.decode_tokens, args.rounds)
    base_p, base_d = speed["fp32"]
    print(f"{'method':18s}{'disk MB':>9s}{'prefill tok/s':>15s}{'x fp32':>8s}{'decode tok/s':>14s}{'x fp32':>8s}"
          + (f"{'ppl':>8s}{'dppl':>8s}" if windows is not None else "") + "  paths (prefill / decode)")
    ok_rows = True
    for name, (p, d) in speed.items():
        r = extra[name]
        line = (f"{name:18s}{r.get('disk_MB', float('nan')):9.1f}{p:15.0f}{p / base_p:8.2f}{d:14.1f}"
                f"{d / base_d:8.2f}")
        if windows is not None:
            line += f"{r['ppl']:8.2f}{100 * (r['ppl'] / extra['fp32']['ppl'] - 1):+7.1f}%"
        fmt = FORMAT_OF.get(name)
        if fmt:
            line += f"  {paths[fmt]['prefill']} / {paths[fmt]['decode']}"
            ok_rows &= p / base_p >= MIN_RATIO and d / base_d >= MIN_RATIO
        print(line)
    print(f"\nevery quantized row (INT8 weight-only, W8A8, INT4 g64) >= {MIN_RATIO}x fp32 at prefill and decode: "
          f"{'PASS' if ok_rows else 'MISS'}   (CPU: {cpu_model()})")
    if "torchao W8A8" in speed:
        ao = speed["torchao W8A8"]
        print(f"ours vs torchao W8A8: prefill {speed['W8A8'][0] / base_p:.2f}x vs {ao[0] / base_p:.2f}x"
              + (f", ppl {extra['W8A8']['ppl']:.2f} vs {extra['torchao W8A8']['ppl']:.2f}" if windows is not None
                 else ""))
    if args.check and not (ok_rows and ok_w8a8):
        sys.exit(1)


if __name__ == "__main__":
    main()
