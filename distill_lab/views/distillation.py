"""Views of notebook 01 (distillation): one position as the distillation loss sees it."""

from __future__ import annotations

import torch

from ..distillation.losses import DistillationLoss

__all__ = ["distillation_view"]


@torch.no_grad()
def distillation_view(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: int,
                      tokenizer, kd_temperature: float, alpha: float, k: int = 8) -> dict:
    """One position, seen by the loss: teacher and student softened at ``T = kd_temperature`` on the teacher's
    top-``k`` tokens, and the loss's weighted terms ``alpha · T² · KL`` and ``(1 − alpha) · CE`` (logits are (V,))."""
    loss = DistillationLoss(kd_temperature, alpha, "forward_kl")
    _, parts = loss(student_logits[None, None].float(), teacher_logits[None, None].float(),
                    torch.tensor([[target]]), return_parts=True)
    q = torch.softmax(teacher_logits.float() / kd_temperature, -1)  # (V,)
    p = torch.softmax(student_logits.float() / kd_temperature, -1)
    top = q.topk(k).indices
    entropy = float(-(q * q.clamp_min(1e-30).log2()).sum())
    return {"kd_temperature": kd_temperature, "alpha": alpha,
            "tokens": [tokenizer.decode([i]) for i in top.tolist()],
            "teacher_probs": q[top].tolist(), "student_probs": p[top].tolist(),
            "target": tokenizer.decode([target]), "teacher_entropy_bits": entropy,
            "kl": parts["kd"], "ce": parts["ce"], **loss.weighted_terms(parts)}
