"""A tiny distillation run for the kill-and-resume and DDP tests (run as a script, also under torchrun).

It trains a 2-layer student from a 3-layer teacher on seeded counting sequences, then writes the final
loss and a fingerprint of the student's weights to ``--out/rank<r>.json``. ``--kill-at N`` kills
the process with SIGKILL right after step N (no clean-up, like a crash or a pulled plug).
"""

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch

from distill_lab.distillation import DistillationLoss, DistillationTrainer, TrainConfig
from distill_lab.models import tiny_llama


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    teacher = tiny_llama(num_layers=3, seed=1)
    student = tiny_llama(num_layers=2, seed=2)
    g = torch.Generator().manual_seed(0)
    # learnable text: each window counts up from a random start with a random stride (1 to 3)
    start = torch.randint(0, 256, (68, 1), generator=g)
    stride = torch.randint(1, 4, (68, 1), generator=g)
    windows = (start + stride * torch.arange(24)) % 256  # (68, 24)
    train, val = windows[:64], windows[64:]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=2,
                      eval_every=4, teacher_bf16=False, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_every=args.checkpoint_every, progress=False)

    def kill(trainer, step, row):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = DistillationTrainer(student, train, teacher=teacher, val_windows=val, config=cfg,
                                  loss=DistillationLoss(kd_temperature=2.0, alpha=0.5),
                                  callbacks=[kill] if args.kill_at else [])
    history = trainer.train(resume=args.resume)
    flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps({
        "world": trainer.world, "steps": trainer.step,
        "losses": [r["loss"] for r in history["train"]],
        "val_ppl": [e["val_ppl"] for e in history["eval"]],
        "weights_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "weights": flat.tolist()}))


if __name__ == "__main__":
    main()
