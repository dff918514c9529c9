"""A new quantization format is one registration: a toy int4 variant, defined in this file alone, goes through
``quantize_``, QAT, save, ``dl.load_model`` and GGUF export without an edit anywhere else in the package."""

import json
from dataclasses import dataclass

import pytest
import torch

import distill_lab as dl
from distill_lab.quantization import (FormatSpec, Int4WeightOnlyConfig, Int4WeightOnlyLinear, ModuleFormat,
                                      QuantizationConfig, convert_, prepare_qat_, quantize_, register_format,
                                      unregister_format)
from distill_lab.quantization.formats import int4_to_ggml
from distill_lab.quantization.primitives import FakeQuantize
from distill_lab.quantization.registry import format_for, module_format
from distill_lab.serialization import save_model


@dataclass
class Int4PerRowConfig(QuantizationConfig):
    """The toy: int4 with one symmetric scale per output row (the whole row is one group); ``embedding_bits``
    comes from ``QuantizationConfig``."""


class Int4PerRowLinear(Int4WeightOnlyLinear):
    """An int4 module whose group is its whole input width: the int4 kernel layout, its own saved kind."""

    kind = "int4_per_row"

    @classmethod
    def from_float(cls, linear, config=None):
        return super().from_float(linear, group_size=linear.in_features, bits=4, symmetric=True)


@dataclass
class Int4PerRowNoGGUFConfig(Int4PerRowConfig):
    """The same toy, registered without a GGUF mapping."""


class Int4PerRowNoGGUFLinear(Int4PerRowLinear):
    kind = "int4_per_row_no_gguf"


def _spec(module_type, to_ggml):
    return FormatSpec(format=module_type.kind, from_float=module_type.from_float,
                      weight_fake_quant=lambda config: FakeQuantize(4, None, True, -1),
                      modules=(ModuleFormat(module_type.kind, module_type.from_exported, to_ggml),))


@pytest.fixture
def toy_formats():
    register_format(Int4PerRowConfig, _spec(Int4PerRowLinear, int4_to_ggml))
    register_format(Int4PerRowNoGGUFConfig, _spec(Int4PerRowNoGGUFLinear, None))
    yield
    unregister_format(Int4PerRowConfig)
    unregister_format(Int4PerRowNoGGUFConfig)


def _tiny():  # the teacher's vocabulary, so to_gguf takes the teacher GGUF's tokenizer (as tests/test_export.py)
    return dl.tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2).eval()


def _ids():
    return torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))


def test_a_toy_int4_format_quantizes_saves_reloads_and_exports(toy_formats, tmp_path):
    model = _tiny()
    summary = quantize_(model, Int4PerRowConfig())
    assert summary.replaced["int4_per_row"] == 2 * 7 and not summary.float_modules
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is Int4PerRowLinear and (up.group_size, up.symmetric) == (64, True)
    with torch.inference_mode():
        ref = model(_ids()).logits

    folder = save_model(model, None, tmp_path / "toy")
    saved = json.loads((folder / "quantization_config.json").read_text())
    assert saved["config"]["type"] == "Int4PerRowConfig"
    assert saved["modules"]["model.layers.0.mlp.up_proj"]["kind"] == "int4_per_row"
    again, _ = dl.load_model(folder, device="cpu")
    assert type(again.model.layers[0].mlp.up_proj) is Int4PerRowLinear
    assert again.lm_head.weight_int8 is again.model.embed_tokens.weight_int8  # the built-in tied int8 head
    with torch.inference_mode():
        torch.testing.assert_close(again(_ids()).logits, ref)

    pytest.importorskip("gguf")
    from distill_lab.export import read_gguf_tensor, to_gguf

    report = to_gguf(again, None, tmp_path / "toy.gguf")
    assert report.tensor_types["blk.0.ffn_up.weight"] == "Q4_1"
    assert report.counts()["Q4_1"] == 2 * 7 and report.int4_groups == sum(
        m.out_features for m in again.modules() if isinstance(m, Int4PerRowLinear))  # one group per row
    back = read_gguf_tensor(tmp_path / "toy.gguf", "blk.0.ffn_up.weight")  # not row-permuted (only q/k are)
    want = again.model.layers[0].mlp.up_proj.dequantized_weight().numpy()
    assert abs(back - want).max() <= 1e-3 * abs(want).max()  # the same codes; scales through fp16


def test_qat_follows_the_toy_format(toy_formats):
    model = _tiny()
    assert "model.layers.0.mlp.up_proj" in prepare_qat_(model, Int4PerRowConfig())
    qat_up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        faked = qat_up.weight_fake_quant(qat_up.weight)
    convert_(model)
    real = model.model.layers[0].mlp.up_proj
    assert type(real) is Int4PerRowLinear
    torch.testing.assert_close(real.dequantized_weight(), faked.float(), rtol=0, atol=1e-2 * faked.abs().max())


def test_a_format_without_gguf_mapping_says_so(toy_formats, tmp_path):
    pytest.importorskip("gguf")
    from distill_lab.export import to_gguf

    model = _tiny()
    quantize_(model, Int4PerRowNoGGUFConfig())
    with pytest.raises(ValueError, match="int4_per_row_no_gguf modules are not exportable to GGUF"):
        to_gguf(model, None, tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()


def test_unregistering_removes_the_format_and_its_module_kind():
    register_format(Int4PerRowConfig, _spec(Int4PerRowLinear, int4_to_ggml))
    with pytest.raises(ValueError, match="already registered"):
        register_format(Int4PerRowConfig, _spec(Int4PerRowLinear, int4_to_ggml))
    unregister_format(Int4PerRowConfig)
    with pytest.raises(ValueError, match=r"config=Int4PerRowConfig.*allowed: an instance of .*Int4WeightOnlyConfig"):
        quantize_(_tiny(), Int4PerRowConfig())
    with pytest.raises(ValueError, match="unknown quantized module kind 'int4_per_row'"):
        module_format("int4_per_row")
    assert format_for(Int4WeightOnlyConfig()).format == "int4"  # the built-ins stay


def test_a_recipe_names_a_registered_format_and_gets_its_config(toy_formats):
    from distill_lab.pipeline.steps import QuantizeStep

    step = QuantizeStep.from_knobs({"format": "int4_per_row", "embedding_bits": None})
    assert step.config == Int4PerRowConfig(embedding_bits=None) and step.algorithm == "rtn"
    with pytest.raises(ValueError, match="algorithm 'awq' needs format int4"):
        QuantizeStep.from_knobs({"format": "int4_per_row", "algorithm": "awq"})


def test_a_format_name_is_registered_once():
    @dataclass
    class Other(QuantizationConfig):
        pass

    with pytest.raises(ValueError, match=r"format 'int4' is already registered; allowed: a name not in int8, w8a8, int4"):
        register_format(Other, FormatSpec(format="int4", from_float=Int4PerRowLinear.from_float,
                                          weight_fake_quant=lambda config: FakeQuantize(4, None, True, -1)))
    with pytest.raises(ValueError, match=r"config=.*Other\(embedding_bits=8\); allowed: an instance of"):
        format_for(Other())  # the refused registration left nothing behind

