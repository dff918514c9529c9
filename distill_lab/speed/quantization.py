"""One Linear at the teacher's shapes through every kernel path: fp32, bf16, int8 weight-only, W8A8, int4 g64 (CPU)."""

from __future__ import annotations

import torch
from torch import nn

from ..quantization.modules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from ..timing import median_seconds

__all__ = ["KERNEL_SHAPES", "format_kernel_table", "kernel_benchmark"]

KERNEL_SHAPES = (("decode: 1×576 → 1536 (gate/up)", 1, 576, 1536),
                 ("prefill: 2048×576 → 1536", 2048, 576, 1536),
                 ("decode: 1×576 → 49152 (tied head)", 1, 576, 49152))


@torch.inference_mode()
def kernel_benchmark(shapes=KERNEL_SHAPES, repeats: int = 20, seed: int = 0) -> list[dict]:
    """Median milliseconds of one Linear at the teacher's shapes: fp32, bf16, int8 weight-only, W8A8, int4 g64 (CPU)."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for label, m, k, n in shapes:
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        x = torch.randn(m, k, generator=gen)
        xb = x.bfloat16()
        bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        bf16.weight.data.copy_(lin.weight.data)
        mods = {"fp32": (lin, x), "bf16": (bf16, xb),
                "int8 weight-only": (Int8WeightOnlyLinear.from_float(lin), x),
                "W8A8": (Int8DynamicLinear.from_float(lin), x),
                "int4 g64": (Int4WeightOnlyLinear.from_float(lin, 64), x)}
        reps = max(5, repeats // 4) if m > 16 else repeats
        ms = {name: 1e3 * median_seconds(lambda mod=mod, inp=inp: mod(inp), reps, warmup=3)
              for name, (mod, inp) in mods.items()}
        rows.append({"shape": label, **ms})
    return rows


def format_kernel_table(rows: list[dict]) -> str:
    """Text table of ``kernel_benchmark`` rows: milliseconds and speed-up over fp32."""
    names = [k for k in rows[0] if k != "shape"]
    lines = [f"{'matmul':36s}" + "".join(f"{n:>20s}" for n in names)]
    for r in rows:
        lines.append(f"{r['shape']:36s}" + "".join(
            f"{r[n]:>11.3f} ms {r['fp32'] / r[n]:4.1f}×" for n in names))
    return "\n".join(lines)
