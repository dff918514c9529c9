"""Healing: distil a pruned model back toward its teacher (Minitron, Muralidharan et al. 2024, arXiv:2407.14679).

``heal`` runs the package's one training loop (``distillation.DistillationTrainer``) with forward KL on the
logits; ``kl_to_teacher`` measures how far a pruned model is from its teacher, per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distillation import (KD_TEMPERATURE, DistillationLoss, DistillationTrainer, TeacherCache, TrainConfig,
                            divergence_reference, soft_target_loss)
from ..runtime import autocast, device_of

__all__ = ["heal", "kl_to_teacher"]


# ----------------------------------------------------------------------------------------------
# Healing: distil the pruned model back toward the teacher (Minitron)
# ----------------------------------------------------------------------------------------------

def heal(student: nn.Module, teacher: nn.Module | None, windows=None, steps: int = 30,
         batch_size: int = 4, lr: float = 3e-4, kd_temperature: float = KD_TEMPERATURE, bf16: bool | str = "auto",
         seed: int = 0, progress: bool = True, use_trainer: bool = True) -> list[float]:
    """Distil a pruned student toward the teacher for ``steps`` steps, in place; return the loss per step.

    Minitron-style healing: forward KL(teacher || student) on the logits only (``alpha = 1``,
    softened at ``kd_temperature``, 1 by default), AdamW with a short warm-up and cosine decay, run by the package's one training
    loop, ``distill_lab.distillation.DistillationTrainer``. ``windows`` is a (N, T) tensor of token
    windows (the teacher runs live; bf16 autocast per ``bf16``, 'auto': where measured faster) or a
    ``distill_lab.distillation.TeacherCache`` of top-k teacher logits, which several pruned students
    can share (``teacher`` may then be None). ``use_trainer=False`` keeps the settings of the former
    minimal local loop (``_heal_local``: windows drawn with replacement, every position, a constant
    learning rate); it needs token windows and a live teacher.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; allowed: an int >= 1")
    is_cache = use_trainer and isinstance(windows, TeacherCache)
    if not is_cache and (not isinstance(windows, torch.Tensor) or windows.dim() != 2):
        raise ValueError("windows: allowed a (N, T) tensor of token ids or a distillation.TeacherCache")
    if teacher is None and not is_cache:
        raise ValueError("heal needs a teacher, or a TeacherCache of its logits as windows")
    if not use_trainer:
        return _heal_local(student, teacher, windows, steps, batch_size, lr, kd_temperature, bf16, seed, progress)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                         warmup_steps=min(5, max(1, steps // 5)), bf16=bf16,
                         teacher_bf16=bf16, seed=seed, progress=progress)
    loss = DistillationLoss(kd_temperature, alpha=1.0, kind="forward_kl")
    trainer = DistillationTrainer(student, windows, teacher=None if is_cache else teacher,
                                  loss=loss, config=config, desc="healing", eval_after=True)
    return [row["loss"] for row in trainer.train()["train"]]


def _heal_local(student, teacher, windows, steps, batch_size, lr, kd_temperature, bf16, seed, progress):
    """Healing with the former local loop's settings, on the one trainer: T² · KL(teacher || student) by
    autograd on every position of windows drawn with replacement, AdamW (unfused, no decay) at a
    constant rate, clipping at 1."""
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, betas=(0.9, 0.999),
                         warmup_steps=0, schedule="constant", sampling="random", fused=False, reseed=False,
                         bf16=bf16, teacher_bf16=bf16, seed=seed, progress=progress)
    trainer = DistillationTrainer(student, windows, teacher=teacher, config=config,
                                  loss=lambda s, t: soft_target_loss(s, t, kd_temperature),
                                  every_position=True, freeze_teacher=False, desc="healing", eval_after=True)
    return [row["loss"] for row in trainer.train()["train"]]


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                  bf16: bool = False) -> float:
    """Mean per-token KL(teacher || student) over (N, T) windows: how far a pruned model is from its teacher."""
    device = device_of(student)
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)  # (B, T)
        with autocast(device, bf16):
            t = teacher(batch, use_cache=False).logits.float()  # (B, T, V)
            s = student(batch, use_cache=False).logits.float()  # (B, T, V)
        total += divergence_reference(s, t).sum().item()  # the package's one divergence, per position
        count += batch.numel()
    return total / count
