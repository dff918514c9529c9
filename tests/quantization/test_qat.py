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


@pytest.mark.parametrize("bits", [4, 8])
def test_qat_embedding_and_tied_head_train_on_the_grid_convert_stores(bits):
    """With embedding=True the tied table is fake-quantized where it is looked up and where the head reads it,
    on the grid convert_ then stores it on: converting an untrained QAT model gives quantize_'s model exactly."""
    from distill_lab.models import tiny_llama
    from distill_lab.quantization.qat import QATEmbedding, qat_parameters

    config = Int4WeightOnlyConfig(group_size=32, embedding_bits=bits)
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    direct = copy.deepcopy(model)
    summary = prepare_qat_(model, config, embedding=True)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QATEmbedding) and isinstance(head, QATLinear) and head.is_head
    assert head.weight is emb.weight and head.weight_fake_quant is emb.weight_fake_quant  # one table, one grid
    assert "model.embed_tokens" in summary.changed and "lm_head" in summary.changed
    assert sum(p is emb.weight for p in qat_parameters(model)) == 1  # trained once, not twice
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    fake = model(ids).logits
    fake.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0  # the STE reaches the table
    convert_(model)
    quantize_(direct, config)
    assert type(model.model.embed_tokens) is type(direct.model.embed_tokens)
    with torch.no_grad():
        real = model(ids).logits
        torch.testing.assert_close(real, direct(ids).logits, rtol=0, atol=0)
    assert ((real - fake.detach()).norm() / fake.norm()) < 3e-2  # the fake grid is the real one up to bf16


def test_qat_embedding_off_by_default_and_float_embedding_kept():
    from distill_lab.models import tiny_llama

    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    prepare_qat_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    prepare_qat_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=None), embedding=True)
    assert type(model.model.embed_tokens) is nn.Embedding  # nothing to train toward: the table stays float
