"""Check the CUDA paths of distill_lab.quantization in one short run: correctness against the CPU reference, speed against bf16.

    python benchmarks/gpu_check.py [--no-teacher]

Without a CUDA GPU it says so and exits 0 (the CPU paths are covered by tests/quantization/).
With one it checks, on the teacher's shapes:
  * ``Int4WeightOnlyLinear`` re-packed for ``aten._weight_int4pack_mm`` (tinygemm layout),
  * ``Int8WeightOnlyLinear`` (``aten._weight_int8pack_mm`` or its dequantize fallback),
  * ``Int8DynamicLinear`` (``torch._int_mm``, with M <= 16 padded to 32 rows),
each against the same module on the CPU, then times them against a bf16 ``nn.Linear`` at decode
(M = 1) and prefill (M = 2048) sizes, and the whole teacher (bf16 vs quantized) when available.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from distill_lab.quantization import (Int4WeightOnlyConfig, Int4WeightOnlyLinear, Int8DynamicConfig,  # noqa: E402
                                      Int8DynamicLinear, Int8WeightOnlyConfig, Int8WeightOnlyLinear, quantize_)


def cuda_time(fn, repeats=50, warmup=5):
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def check_modules() -> bool:
    ok = True
    torch.manual_seed(0)
    print("Correctness vs the CPU module (relative error of the output):")
    for n, k in [(1536, 576), (576, 1536), (49152, 576)]:
        lin = torch.nn.Linear(k, n, bias=False)
        for m in (1, 7, 64):
            x = torch.randn(m, k)
            for name, cpu_mod in [("int4 g64", Int4WeightOnlyLinear.from_float(lin, 64)),
                                  ("int8 weight-only", Int8WeightOnlyLinear.from_float(lin)),
                                  ("W8A8", Int8DynamicLinear.from_float(lin))]:
                if name == "int4 g64":
                    gpu_mod = copy.deepcopy(cpu_mod).repack("cuda")
                    layout = gpu_mod.layout
                else:
                    gpu_mod, layout = copy.deepcopy(cpu_mod).cuda(), "-"
                err = rel_err(gpu_mod(x.cuda()), cpu_mod(x))
                good = err < 2e-2
                ok &= good
                print(f"  {name:17s} N={n:6d} K={k:5d} M={m:3d} layout={layout:5s} rel.err={err:.2e} "
                      f"{'ok' if good else 'FAIL'}")
    return ok


def time_modules():
    print("\nSpeed vs bf16 nn.Linear (median ms, CUDA events; ratio = bf16 / method):")
    torch.manual_seed(0)
    for n, k in [(1536, 576), (49152, 576), (8192, 8192)]:
        lin = torch.nn.Linear(k, n, bias=False)
        mods = {"bf16": copy.deepcopy(lin).cuda().bfloat16(),
                "int4 g64": Int4WeightOnlyLinear.from_float(lin, 64).repack("cuda"),
                "int8 weight-only": Int8WeightOnlyLinear.from_float(lin).cuda(),
                "W8A8": Int8DynamicLinear.from_float(lin).cuda()}
        for m in (1, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                t = {name: cuda_time(lambda mod=mod: mod(x)) for name, mod in mods.items()}
            cells = "  ".join(f"{name} {v:.3f} ({t['bf16'] / v:.2f}x)" for name, v in t.items())
            print(f"  N={n:6d} K={k:5d} M={m:5d}: {cells}")


def time_teacher():
    import distill_lab as dl

    try:
        model, tok = dl.load_teacher(device="cuda")
    except Exception as err:  # the offline teacher package may be missing on a bare machine
        print(f"\nteacher not available ({type(err).__name__}: {err}); whole-model timing skipped")
        return
    windows = dl.corpus_windows("pydoc", "test", tok, 256)[:16].cuda()
    print("\nTeacher on CUDA: prefill 8 x 256, decode batch 1 (32 tokens), test ppl on 16 windows")
    base = model.to(torch.bfloat16)
    rows = {}
    for name, config in [("bf16", None), ("INT8 weight-only", Int8WeightOnlyConfig()), ("W8A8", Int8DynamicConfig()),
                         ("INT4 g64", Int4WeightOnlyConfig())]:
        m = copy.deepcopy(base)
        if config is not None:
            quantize_(m, config)
        lat = dl.latency(m, batch=8, seq=256, decode_tokens=32, repeats=5)
        ppl = dl.perplexity(m, windows, progress=False)
        rows[name] = (lat["prefill_tokens_per_s"], lat["decode_tokens_per_s"], ppl)
    b = rows["bf16"]
    for name, (p, d, ppl) in rows.items():
        print(f"  {name:17s} prefill {p:10.0f} tok/s ({p / b[0]:.2f}x)  decode {d:7.1f} tok/s ({d / b[1]:.2f}x)  "
              f"ppl {ppl:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-teacher", action="store_true", help="skip the whole-teacher timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU here: the CUDA kernel paths (aten._weight_int4pack_mm, torch._int_mm on CUDA, "
              "aten._weight_int8pack_mm) are not checked. The CPU kernels and the pure-PyTorch fallbacks are "
              "tested by tests/quantization/; run this script on a machine with a GPU.")
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    ok = check_modules()
    time_modules()
    if not args.no_teacher:
        time_teacher()
    print("\nall CUDA outputs match the CPU reference" if ok else "\nSOME CUDA OUTPUTS DO NOT MATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
