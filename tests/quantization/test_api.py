"""Tests for distill_lab.quantization.api: quantize_ on whole models, its summary, and the size measurements."""

import pytest
import torch
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.quantization.api import (QuantizationSummary, compression_report, fp32_equivalent_bytes,
                                          linear_from_config, memory_bytes, quantize_, quantize_embedding_and_head_)
from distill_lab.quantization.configs import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                                              SmoothQuantConfig)
from distill_lab.quantization.modules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from distill_lab.quantization.serialization import load_quantized, save_quantized

from .helpers import linear, tiny


def test_embedding_bits_none_keeps_embedding_and_head_in_float(tmp_path):
    model = tiny()
    summary = quantize_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=None))
    assert set(summary.float_modules) == {"model.embed_tokens", "lm_head"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 8))
    save_quantized(model, tmp_path / "m")
    again = load_quantized(tmp_path / "m", device="cpu")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_filter_fn_and_float_report():
    model = tiny()
    summary = quantize_(model, Int8DynamicConfig(), filter_fn=lambda m, name: "down_proj" not in name)
    assert all("down_proj" in k for k in summary.float_modules)
    assert len(summary.float_modules) == 2
    assert "float" in repr(summary)
    report = compression_report(model, on_disk=False)
    assert set(report["float_modules"]) == set(summary.float_modules)


def test_int8_dynamic_head_option():
    model = tiny()
    quantize_(model, Int8DynamicConfig(head="w8a8"))
    assert isinstance(model.lm_head, Int8DynamicLinear)
    model = tiny()
    quantize_(model, Int8DynamicConfig())
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="head"):
        Int8DynamicConfig(head="fp8")


def test_generate_runs_on_quantized_model():
    model = tiny()
    quantize_(model, Int8DynamicConfig())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_quantize_refuses_what_is_not_a_config():
    with pytest.raises(ValueError, match="config"):
        quantize_(tiny_llama(), "int8")
    with pytest.raises(ValueError, match=r"allowed: an instance of Int8WeightOnlyConfig, Int8DynamicConfig, "
                                         r"Int4WeightOnlyConfig"):
        quantize_(tiny(), SmoothQuantConfig())
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig.group_size=256 divides none"):
        quantize_(tiny(), Int4WeightOnlyConfig(group_size=256))


def test_linear_from_config_builds_each_kind():
    lin = linear(32, 64, bias=True)
    assert isinstance(linear_from_config(lin, Int8WeightOnlyConfig()), Int8WeightOnlyLinear)
    w8a8 = linear_from_config(lin, Int8DynamicConfig(act_granularity="per_tensor"))
    assert isinstance(w8a8, Int8DynamicLinear) and w8a8.act_granularity == "per_tensor"
    int3 = linear_from_config(lin, Int4WeightOnlyConfig(group_size=32, bits=3, symmetric=True))
    assert isinstance(int3, Int4WeightOnlyLinear) and (int3.bits, int3.group_size, int3.symmetric) == (3, 32, True)
    assert linear_from_config(lin, Int4WeightOnlyConfig(group_size=128)) is None  # 64 inputs: no group of 128
    with pytest.raises(ValueError, match="config="):
        linear_from_config(lin, SmoothQuantConfig())


def test_embedding_and_head_alone_and_the_summary():
    model = tiny()
    summary = QuantizationSummary(config={"type": "Int8WeightOnlyConfig"})
    assert quantize_embedding_and_head_(model, Int8WeightOnlyConfig(), summary) is summary
    assert dict(summary) == {"model.embed_tokens": "int8_embedding", "lm_head": "int8_weight_only"}
    assert summary.replaced == {"int8_embedding": 1, "int8_weight_only": 1} and summary.tied_head
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # the rest is left alone
    assert repr(summary) == ("QuantizationSummary(Int8WeightOnlyConfig: 1× int8_embedding, 1× int8_weight_only; "
                             "kept in float: none)")


def test_sizes_of_a_float_model_are_its_fp32_bytes():
    model = tiny()
    n_params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    before = memory_bytes(model)
    assert before == fp32_equivalent_bytes(model) >= 4 * n_params  # (+ float buffers such as RoPE's)
    quantize_(model, Int8WeightOnlyConfig())
    assert fp32_equivalent_bytes(model) == before and memory_bytes(model) < before / 3


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(group_size=32, embedding_bits=4),
                                    Int8WeightOnlyConfig(embedding_bits=8)], ids=repr)
def test_dequantize_gives_a_float_model_with_the_quantized_weights(config):
    from distill_lab.quantization.api import dequantize_

    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    quantize_(model, config)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    summary = dequantize_(model)
    assert summary.changed and not hasattr(model, "quantization_config")
    assert all(type(m) in (nn.Linear, nn.Embedding) for m in model.modules() if hasattr(m, "weight")
               and m.weight is not None and m.weight.dim() == 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    with torch.no_grad():  # the same weights, now in fp32 matmuls (the int kernels compute in bf16/int8)
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()) < 3e-2
