# shim for the issue-13 move; removed when the restructure is merged
"""Former home of pruning, now ``distill_lab.pruning`` (techniques), ``distill_lab.views.pruning`` (lesson
views) and ``distill_lab.speed.pruning`` (speed comparisons). Every name it had is re-exported here.

Healing (``heal``, ``kl_to_teacher``) still lives here; it moves to ``distill_lab.pruning.healing`` next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import sample_batch
from .hardware import resolve_bf16
from .pruning.masks import GRANULARITIES, is_nm_sparse, magnitude_scores, nm_mask, unstructured_mask, wanda_scores
from .pruning.selection import DEFAULT_EXCLUDE, prunable_linears
from .pruning.sparse_storage import (SPARSE_FORMAT_TAG, STORAGE_FORMATS, CSRLinear, load_sparse, save_dense_bytes,
                                     save_sparse, semi_structured_available, sparse_bytes, sparse_bytes_on_disk,
                                     sparsity_stats, to_semi_structured_, to_sparse_csr_)
from .pruning.structured import (HEAD_GRANULARITIES, StructuredConfig, block_influence, importance, prune_channels,
                                 prune_heads, prune_layers, prune_structured)
from .pruning.structured import IMPORTANCE_METRICS as IMPORTANCE_METHODS
from .pruning.unstructured import MagnitudeConfig, WandaConfig, input_norms, prune_
from .runtime import device_of as _device_of
from .speed.pruning import compare_speed, semi_structured_speed
from .views.pruning import (describe, layer_pruning_view, linear_inputs, sparsity_curve, sparsity_curve_view,
                            to_json)

__all__ = ["CSRLinear", "DEFAULT_EXCLUDE", "GRANULARITIES", "HEAD_GRANULARITIES", "IMPORTANCE_METHODS",
           "MagnitudeConfig", "SPARSE_FORMAT_TAG", "STORAGE_FORMATS", "StructuredConfig", "WandaConfig",
           "block_influence", "compare_speed", "describe", "heal", "importance", "input_norms", "is_nm_sparse",
           "kl_to_teacher", "layer_pruning_view", "linear_inputs", "load_sparse", "magnitude_scores", "nm_mask",
           "prunable_linears", "prune_", "prune_channels", "prune_heads", "prune_layers", "prune_structured",
           "save_dense_bytes", "save_sparse", "semi_structured_available", "semi_structured_speed", "sparse_bytes",
           "sparse_bytes_on_disk", "sparsity_curve", "sparsity_curve_view", "sparsity_stats", "to_json",
           "to_semi_structured_", "to_sparse_csr_", "unstructured_mask", "wanda_scores"]


# ----------------------------------------------------------------------------------------------
# Healing: distil the pruned model back toward the teacher (Minitron)
# ----------------------------------------------------------------------------------------------

def heal(student: nn.Module, teacher: nn.Module | None, windows=None, steps: int = 30,
         batch_size: int = 4, lr: float = 3e-4, temperature: float = 1.0, bf16: bool | str = "auto",
         seed: int = 0, progress: bool = True, use_trainer: bool = True) -> list[float]:
    """Distil a pruned student toward the teacher for ``steps`` steps, in place; return the loss per step.

    Minitron-style healing: forward KL(teacher || student) on the logits only (``alpha = 1``,
    temperature 1), AdamW with a short warm-up and cosine decay. ``windows`` is a (N, T) tensor
    of token windows (the teacher runs live; bf16 autocast per ``bf16``, 'auto': where measured faster)
    or a ``distill_lab.distill.TeacherCache`` of top-k teacher logits, which several pruned students
    can share (``teacher`` may then be None).
    It uses ``distill_lab.distill.DistillationTrainer``; ``use_trainer=False`` (or a missing
    ``distill`` module) runs a minimal local loop with the same loss on full-vocabulary logits.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; allowed: an int >= 1")
    trainer_mod = None
    if use_trainer:
        try:
            from . import distill as trainer_mod
        except ImportError:  # the distillation module is optional for this lesson
            trainer_mod = None
    is_cache = trainer_mod is not None and isinstance(windows, trainer_mod.TeacherCache)
    if not is_cache and (not isinstance(windows, torch.Tensor) or windows.dim() != 2):
        raise ValueError("windows: allowed a (N, T) tensor of token ids or a distill.TeacherCache")
    if teacher is None and not is_cache:
        raise ValueError("heal needs a teacher, or a TeacherCache of its logits as windows")
    if trainer_mod is None:
        return _heal_local(student, teacher, windows, steps, batch_size, lr, temperature, bf16, seed, progress)
    config = trainer_mod.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                                     warmup_steps=min(5, max(1, steps // 5)), bf16=bf16,
                                     teacher_bf16=bf16, seed=seed, progress=progress)
    loss = trainer_mod.DistillationLoss(temperature=temperature, alpha=1.0, kind="forward_kl")
    trainer = trainer_mod.DistillationTrainer(student, windows, teacher=None if is_cache else teacher,
                                              loss=loss, config=config)
    try:
        history = trainer.train()
    finally:
        student.eval()
    return [row["loss"] for row in history["train"]]


def _heal_local(student, teacher, windows, steps, batch_size, lr, temperature, bf16, seed, progress):
    """The fallback healing loop: KL(teacher || student) on full logits, AdamW, gradient clipping."""
    device = _device_of(student)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    teacher.eval()
    student.train()
    losses = []
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_bf16(bf16, device))
    try:
        for _ in tqdm(range(steps), desc="healing", leave=False, disable=not progress):
            batch = sample_batch(windows, batch_size, g).to(device)  # (B, T)
            with torch.no_grad(), torch.autocast(**autocast):
                t_logits = teacher(batch, use_cache=False).logits.float()  # (B, T, V)
            with torch.autocast(**autocast):
                s_logits = student(batch, use_cache=False).logits
            s_logp = F.log_softmax(s_logits.float() / temperature, -1)  # (B, T, V)
            t_logp = F.log_softmax(t_logits / temperature, -1)  # (B, T, V)
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2  # per-token KL
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    finally:
        student.eval()
    return losses


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                  bf16: bool = False) -> float:
    """Mean per-token KL(teacher || student) over (N, T) windows: how far a pruned model is from its teacher."""
    device = _device_of(student)
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)  # (B, T)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_bf16(bf16, device)):
            t = F.log_softmax(teacher(batch, use_cache=False).logits.float(), -1)  # (B, T, V)
            s = F.log_softmax(student(batch, use_cache=False).logits.float(), -1)  # (B, T, V)
        total += (t.exp() * (t - s)).sum().item()
        count += batch.numel()
    return total / count
