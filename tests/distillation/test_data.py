"""distill_lab.distillation.data: next-token labels and sequence-level KD data from the real teacher."""

import math

import pytest
import torch

from distill_lab.distillation.cache import cache_teacher_logits
from distill_lab.distillation.data import generate_distillation_data, shift_labels
from distill_lab.distillation.losses import DistillationLoss
from distill_lab.models import tiny_llama

from ._helpers import run


def test_shift_labels_masks_last_and_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    assert shift_labels(ids).tolist() == [[6, 7, 0, 0, -100]]
    assert shift_labels(ids, pad_token_id=0).tolist() == [[6, 7, -100, -100, -100]]


@pytest.mark.teacher
def test_generate_distillation_data_and_real_cache(teacher):
    model, tokenizer = teacher
    data = generate_distillation_data(model, tokenizer, ["def add(a, b):", "The list type"],
                                      max_new_tokens=4, progress=False)
    assert data.input_ids.shape[0] == 2 and len(data.texts) == 2
    for row, lab in zip(data.input_ids, data.labels):
        kept = (lab != -100).nonzero().flatten()
        assert len(kept) == 4  # exactly the 4 generated tokens are targets
        assert torch.equal(lab[kept], row[kept + 1])
    windows = data.input_ids[:1, :6]
    cache = cache_teacher_logits(model, windows, k=64, bf16=True, progress=False)
    assert cache.mass.min() > 0.3 and cache.full_vocab_nbytes() / cache.nbytes() > 400
    student = tiny_llama(vocab_size=model.config.vocab_size, hidden_size=16, num_heads=2,
                         num_kv_heads=1)
    _, history = run(student, data, steps=2, loss=DistillationLoss(alpha=0.0),
                     cfg=dict(batch_size=2))
    assert history["train"][-1]["tokens"] == 8
    assert math.isfinite(history["train"][-1]["loss"])
