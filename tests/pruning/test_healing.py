"""Tests for distill_lab.pruning.healing: heal moves a pruned model toward its teacher; bad input is refused."""

import math

import pytest
import torch

from distill_lab import pruning as P


# ---------------------------------------------------------------- healing

def _sharp_teacher(make_gqa_tiny):
    """A tiny teacher with peaked next-token distributions (a random one is nearly uniform)."""
    teacher = make_gqa_tiny()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    return teacher


@pytest.mark.parametrize("use_trainer", [True, False])
def test_heal_moves_pruned_model_toward_teacher(use_trainer, gqa_tiny):
    make_gqa_tiny = gqa_tiny
    teacher = _sharp_teacher(make_gqa_tiny)
    student = P.prune_channels(make_gqa_tiny(seed=1), 0.5)  # far from the teacher: a different init
    windows = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(1))
    before = P.kl_to_teacher(student, teacher, windows)
    losses = P.heal(student, teacher, windows, steps=25, batch_size=8, lr=3e-3, progress=False,
                    bf16=False, use_trainer=use_trainer)
    after = P.kl_to_teacher(student, teacher, windows)
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    assert after < 0.8 * before, (before, after)
    assert not student.training


def test_heal_rejects_bad_input(gqa_tiny):
    teacher = gqa_tiny()
    with pytest.raises(ValueError, match="steps"):
        P.heal(teacher, teacher, torch.zeros(4, 8, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="windows"):
        P.heal(teacher, teacher, torch.zeros(8, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="teacher"):
        P.heal(teacher, None, torch.zeros(4, 8, dtype=torch.long), steps=1)
