"""Teacher speed and memory in fp32 vs bf16 autocast, as ratios from one run.

Usage: python benchmarks/baseline.py [--batch 8 --seq 256 --decode 32 --repeats 3]
"""

import argparse

import torch

import distill_lab as dl


def main():
    """Measure prefill/decode speed and peak memory of the teacher in fp32 and bf16 autocast."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    teacher, _ = dl.load_teacher()
    env = dl.environment_info()
    print(f"device: {env['device']} | threads: {env['cpu_threads']} | torch {env['torch']}")
    rows = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        speed, peak = dl.peak_memory(lambda: dl.latency(teacher, batch=args.batch, seq=args.seq,
                                                        decode_tokens=args.decode,
                                                        repeats=args.repeats, bf16=bf16))
        rows[label] = {**speed, "peak_bytes": peak}
    base = rows["fp32"]
    print(f"{'':6}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak MiB':>10}"
          f"{'prefill x':>11}{'decode x':>10}{'memory x':>10}")
    for label, r in rows.items():
        print(f"{label:6}{r['prefill_tokens_per_s']:>15.0f}{r['decode_tokens_per_s']:>14.1f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}"
              f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>10.2f}x"
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>9.2f}x"
              f"{r['peak_bytes'] / base['peak_bytes']:>9.2f}x")
    print(f"(batch {args.batch} x {args.seq} prefill, batch 1 decode of {args.decode} tokens, "
          f"median of {args.repeats}; peak = process RSS on the CPU, allocator peak on CUDA)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
