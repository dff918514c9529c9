"""Exercise checks for notebook 01 (distillation): the temperature-scaled KL, reverse KL, a top-k teacher."""

from __future__ import annotations

import torch

from ..distillation import DistillationLoss, TopKLogits
from ._check import check


def _kd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    loss = DistillationLoss(temperature=temperature, alpha=1.0, kind="forward_kl")
    return loss(student_logits[None].double(), teacher_logits[None].double())


def _reverse_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    loss = DistillationLoss(temperature=temperature, alpha=1.0, kind="reverse_kl")
    return loss(student_logits[None].double(), teacher_logits[None].double()) / temperature ** 2


def _topk_reference(values: torch.Tensor, indices: torch.Tensor, vocab_size: int,
                    temperature: float) -> torch.Tensor:
    q = torch.softmax(values.double() / temperature, -1)
    return torch.zeros(*values.shape[:-1], vocab_size, dtype=torch.float64).scatter_(-1, indices, q)


def _logit_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, v, generator=g) * s, torch.randn(n, v, generator=g) * s, t)
            for n, v, s, t in ((1, 5, 1.0, 1.0), (4, 30, 3.0, 2.0), (16, 200, 5.0, 4.0), (3, 10, 2.0, 0.5))]


def check_kd_loss(fn) -> bool:
    """Check ``fn(student_logits, teacher_logits, T)`` on (N, V) logits: ``T² · mean_rows KL(q_T ‖ p_T)``."""
    return check("temperature-scaled KL", fn, _kd_reference, _logit_cases(0), atol=1e-5, rtol=1e-4)


def check_reverse_kl(fn) -> bool:
    """Check ``fn(student_logits, teacher_logits, T)``: ``mean_rows KL(p_T ‖ q_T)`` (no T² factor)."""
    return check("reverse KL", fn, _reverse_reference, _logit_cases(1), atol=1e-5, rtol=1e-4)


def check_topk_teacher(fn) -> bool:
    """Check ``fn(values, indices, vocab_size, T)``: the teacher's top-k, renormalised, as a (N, V) distribution."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for n, v, k, t in ((1, 8, 3, 1.0), (5, 100, 10, 2.0), (4, 50, 50, 0.7)):
        logits = torch.randn(n, v, generator=g) * 4
        values, indices = logits.topk(k, -1)
        cases.append((values, indices, v, t))
    ok = check("top-k teacher distribution", fn, _topk_reference, cases, atol=1e-6, rtol=1e-5)
    if ok:  # and it is the distribution the cached loss uses
        values, indices, v, t = cases[1]
        student = torch.randn(1, values.shape[0], v, generator=g)
        q = torch.as_tensor(fn(values, indices, v, t), dtype=torch.float64)
        mine = (q * (q.clamp_min(1e-300).log() - torch.log_softmax(student[0].double() / t, -1))).sum(-1).mean()
        ours = DistillationLoss(t, 1.0)(student, TopKLogits(values[None], indices[None])) / t ** 2
        assert abs(mine.item() - ours.item()) < 1e-4, "your distribution differs from the one the loss uses"
    return ok
