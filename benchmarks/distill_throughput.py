"""Distillation training throughput: live fp32 teacher vs live bf16 teacher vs cached top-k logits.

One run, one student (the teacher with every other block, 15 layers), the same batches and the
same student settings (bf16 autocast, fp32 master weights) in all three modes; only where the
teacher's distribution comes from changes. Steps are timed round-robin (mode A, B, C, A, B, C, ...)
so that a machine whose load drifts slows every mode alike; the median step is reported.

Usage: python benchmarks/distill_throughput.py [--batch 4 --seq 128 --steps 4 --k 64]
"""

import argparse
import statistics
import sys
import time

import distill_lab as dl
from distill_lab.distillation import DistillationLoss, DistillationTrainer, TrainConfig, cache_teacher_logits


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main():
    """Time distillation steps in three modes and print tokens/s, ratios and peak memory."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--k", type=int, default=64, help="teacher logits kept per token in the cache")
    ap.add_argument("--no-check", action="store_true", help="do not fail when cached < 2x fp32 live")
    args = ap.parse_args()

    teacher, tokenizer = dl.load_teacher()
    env = dl.environment_info()
    print(f"device: {env['device']} | threads: {env['cpu_threads']} | torch {env['torch']}")
    n = args.batch * (args.steps + 1)
    windows = dl.corpus_windows("pydoc", "train", tokenizer, args.seq)[:n]
    start = time.perf_counter()
    cache = cache_teacher_logits(teacher, windows, k=args.k, batch_size=args.batch, progress=False)
    cache_s = time.perf_counter() - start
    modes = {"live fp32 teacher": dict(train=windows, teacher=teacher, teacher_bf16=False),
             "live bf16 teacher": dict(train=windows, teacher=teacher, teacher_bf16=True),
             f"cached top-{args.k}": dict(train=cache, teacher=None, teacher_bf16=True)}
    trainers, peaks, times = {}, {}, {name: [] for name in modes}
    for name, m in modes.items():
        student = dl.make_student(teacher, "layer_drop", keep_every=2)
        cfg = TrainConfig(steps=args.steps + 1, batch_size=args.batch, bf16=True,
                          teacher_bf16=m["teacher_bf16"], progress=False)
        trainers[name] = DistillationTrainer(student, m["train"], teacher=m["teacher"], config=cfg,
                                             loss=DistillationLoss(kd_temperature=2.0, alpha=0.5))
        before = _rss_bytes()
        _, peak = dl.peak_memory(trainers[name].train_step)  # warm-up step, and its peak
        peaks[name] = peak - before if trainers[name].device.type == "cpu" else peak
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            times[name].append(trainer.train_step()["seconds"])

    tokens = args.batch * args.seq
    base = statistics.median(times["live fp32 teacher"])
    print(f"\nstudent: 15 of 30 blocks, bf16 autocast; batch {args.batch} x {args.seq} tokens; "
          f"median of {args.steps} steps per mode")
    print(f"{'mode':22}{'s/step':>8}{'tokens/s':>10}{'speed x':>9}{'peak MiB':>10}")
    ratios = {}
    for name in modes:
        sec = statistics.median(times[name])
        ratios[name] = base / sec
        print(f"{name:22}{sec:>8.2f}{tokens / sec:>10.0f}{ratios[name]:>8.2f}x{peaks[name] / 2**20:>10.0f}")
    print(f"\nbuilding the top-{args.k} cache once: {cache_s:.1f} s for {windows.numel()} tokens "
          f"(bf16 teacher), {cache.nbytes() / windows.numel():.0f} bytes/token vs "
          f"{cache.full_vocab_nbytes() / windows.numel():.0f} for full fp32 logits "
          f"({cache.full_vocab_nbytes() / cache.nbytes():.0f}x smaller)")
    print("peak = growth of the process RSS during the first step (activations, logits, teacher, AdamW "
          "state) on the CPU; allocator peak on CUDA")
    cached = ratios[f"cached top-{args.k}"]
    verdict = "PASS" if cached >= 2 else "FAIL"
    print(f"{verdict}: cached top-{args.k} is {cached:.2f}x the fp32 live teacher's speed per step "
          f"(required: >= 2x)")
    if cached < 2 and not args.no_check:
        sys.exit(1)


if __name__ == "__main__":
    main()
