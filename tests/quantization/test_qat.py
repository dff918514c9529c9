"""Tests for distill_lab.quantization.qat (quantization-aware training): the same rounding as quantize_, and the STE."""

import copy

import pytest
import torch
from torch import nn

from distill_lab.distillation import soft_target_loss
from distill_lab.quantization.primitives import FakeQuantize
from distill_lab.quantization.qat import QATLinear, convert_, prepare_qat_, train_qat
from distill_lab.quantization.api import quantize_
from distill_lab.quantization.configs import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig
from distill_lab.quantization.modules import Int4WeightOnlyLinear
from distill_lab.quantization.primitives import fake_quantize

from .helpers import tiny


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(group_size=32), Int4WeightOnlyConfig(group_size=32, bits=3),
                                    Int8DynamicConfig(), Int8WeightOnlyConfig()], ids=repr)
def test_qat_forward_matches_converted_model(config):
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    prepare_qat_(model, config)
    assert sum(isinstance(m, QATLinear) for m in model.modules()) == 14
    fake = model(ids).logits
    convert_(model)
    assert not any(isinstance(m, (QATLinear, nn.Linear)) for m in model.modules())
    real = model(ids).logits
    direct = copy.deepcopy(tiny())
    quantize_(direct, config)
    torch.testing.assert_close(real, direct(ids).logits, rtol=1e-5, atol=1e-5)  # same modules, same rounding
    assert ((real - fake).norm() / fake.norm()) < 3e-2  # fake quant = real kernels up to bf16


def test_fake_quantize_straight_through_gradient():
    w = torch.randn(4, 32, requires_grad=True)
    fq = FakeQuantize(4, 16, False)
    out = fq(w)
    torch.testing.assert_close(out, fake_quantize(w.detach(), 4, 16, False))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_training_reduces_kd_loss():
    teacher = tiny()
    with torch.no_grad():  # peaked logits, so there is something to distil
        teacher.model.embed_tokens.weight.mul_(8)
    student = copy.deepcopy(teacher)
    prepare_qat_(student, Int4WeightOnlyConfig(group_size=32, bits=2))
    windows = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = soft_target_loss(student(windows).logits, teacher(windows).logits).item()
    history = train_qat(student, teacher, windows, steps=30, batch_size=8, lr=1e-3, bf16=False,
                        progress=False)
    with torch.no_grad():
        after = soft_target_loss(student(windows).logits, teacher(windows).logits).item()
    assert len(history) == 30 and after < 0.7 * before
    assert all(p.requires_grad for p in student.parameters())  # frozen ones restored
    convert_(student)
    assert isinstance(student.model.layers[0].mlp.up_proj, Int4WeightOnlyLinear)


def test_qat_refuses_what_is_not_a_config():
    with pytest.raises(ValueError, match="allowed: an instance of Int8WeightOnlyConfig, Int8DynamicConfig"):
        prepare_qat_(tiny(), "int4")
