"""distill_lab.distillation.cache: cached top-k teacher logits (atomic safetensors) and their fidelity."""

import os

import pytest
import torch

from distill_lab.distillation.cache import TeacherCache, cache_teacher_logits, topk_fidelity
from distill_lab.distillation.losses import DistillationLoss
from distill_lab.models import tiny_llama

from ._helpers import random_case


def test_topk_fidelity_improves_with_k():
    student, teacher, labels = random_case(V=200, seed=9, scale=3.0)
    rows = topk_fidelity(student, teacher, labels, [1, 8, 64, 200], DistillationLoss(2.0, 0.5))
    errors = [r["rel_error"] for r in rows]
    masses = [r["teacher_mass"] for r in rows]
    assert errors[-1] < 1e-6 and abs(masses[-1] - 1) < 1e-6
    assert errors[0] > errors[2] and masses == sorted(masses)


def test_cache_teacher_logits_roundtrip_atomic(tmp_path):
    teacher = tiny_llama(num_layers=2, seed=1)
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cache.safetensors"
    path.write_text("an old file that must be replaced whole")
    cache = cache_teacher_logits(teacher, windows, k=8, path=path, batch_size=2, bf16=False,
                                 progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cache.safetensors"]  # no temp file left behind
    loaded = TeacherCache.load(path)
    assert loaded.k == 8 and loaded.meta["vocab_size"] == 256
    assert torch.equal(loaded.windows, windows) and torch.equal(loaded.indices, cache.indices)
    with torch.no_grad():
        full = teacher(windows).logits
    v, i = full.topk(8, -1)
    assert torch.equal(loaded.indices.long(), i)
    assert torch.allclose(loaded.values.float(), v, atol=1e-2)
    mass = torch.softmax(full, -1).topk(8, -1).values.sum(-1)
    assert torch.allclose(loaded.mass, mass, atol=1e-4)
    assert cache.full_vocab_nbytes() == 5 * 12 * 256 * 4
    assert cache.nbytes() == 5 * 12 * (8 * 2 + 8 * 4 + 4)
    with pytest.raises(ValueError, match="k="):
        cache_teacher_logits(teacher, windows, k=0)
    first = cache.head(3)  # the first windows with their own logits
    assert len(first) == 3 and torch.equal(first.windows, windows[:3]) and torch.equal(first.values, cache.values[:3])
    assert cache.head(9) is cache
