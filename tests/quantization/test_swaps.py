"""Issue 28, findings 6-8: a tied output head keeps its own bias (BERT/RoBERTa decoders, Phi tied) through
every technique, save and reload; a module swap that breaks the forward (dense Llama4) is undone and refused.

Each test fails on the code the issue probed (2c49872).
"""

import pytest
import torch


# -- 6, 7. a tied output head with a bias of its own (BERT/RoBERTa decoders, Phi tied) -------------

def _bert(tie=True):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, is_decoder=True, max_position_embeddings=64, tie_word_embeddings=tie)
    model = BertLMHeadModel(cfg).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_(0, 1.0)  # a bias that matters (random init leaves it at zero)
    return model


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 1.0)
    return model


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))


def _rel(model, ref):
    with torch.no_grad():
        out = model(IDS).logits
    return ((out - ref).norm() / ref.norm()).item()


def _technique(name):
    from distill_lab.quantization import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig, convert_,
                                          gptq_, prepare_qat_, quantize_)

    int4 = Int4WeightOnlyConfig(group_size=32, embedding_bits=4)
    return {"int8": (lambda m: quantize_(m, Int8WeightOnlyConfig()), 0.02),
            "w8a8-head": (lambda m: quantize_(m, Int8DynamicConfig(head="w8a8")), 0.03),
            "int4": (lambda m: quantize_(m, int4), 0.06),
            "gptq": (lambda m: gptq_(m, int4, calibration=[IDS], progress=False), 0.06),
            "qat-convert": (lambda m: (prepare_qat_(m, Int8WeightOnlyConfig()), convert_(m)), 0.02)}[name]


@pytest.mark.parametrize("family", ["bert", "phi"])
@pytest.mark.parametrize("name", ["int8", "w8a8-head", "int4", "gptq", "qat-convert"])
def test_finding6_a_tied_head_keeps_its_bias(family, name, tmp_path):
    from distill_lab.quantization import load_quantized, save_quantized

    model = _bert() if family == "bert" else _phi()
    with torch.no_grad():
        ref = model(IDS).logits
    apply, band = _technique(name)
    apply(model)
    head = model.get_output_embeddings()
    assert getattr(head, "bias", None) is not None, f"{name}: the tied head lost its bias"
    assert _rel(model, ref) < band  # the old code: 0.74-0.98
    save_quantized(model, tmp_path / "m")
    assert _rel(load_quantized(tmp_path / "m", device="cpu"), ref) < band


def test_finding7_a_shared_float_bias_reloads_and_stays_shared(tmp_path):
    from distill_lab.quantization import Int8WeightOnlyConfig, load_quantized, quantize_, save_quantized

    model = _bert()
    quantize_(model, Int8WeightOnlyConfig(embedding_bits=None))  # embedding and head stay float, tied
    with torch.no_grad():
        ref = model(IDS).logits
    save_quantized(model, tmp_path / "m")
    back = load_quantized(tmp_path / "m", device="cpu")  # the old code: "missing ['cls.predictions.decoder.bias']"
    assert _rel(back, ref) < 1e-6
    assert back.cls.predictions.decoder.bias is back.cls.predictions.bias
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight


# -- 8. after a module swap the model must still run, else the swap is undone and refused ----------

def _llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, intermediate_size=128, intermediate_size_mlp=128,
                           num_local_experts=1, interleave_moe_layer_step=0, moe_layers=[], no_rope_layers=[1, 1],
                           layer_types=["full_attention"] * 2)
    return Llama4ForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["int8", "gptq", "convert"])
def test_finding8_a_swap_that_breaks_the_forward_is_undone_and_refused(name):
    from distill_lab.quantization import Int8WeightOnlyConfig, convert_, prepare_qat_

    model = _llama4()  # reads embed_tokens.weight.device in its forward: a quantized embedding has no .weight
    if name == "convert":
        prepare_qat_(model, Int8WeightOnlyConfig())  # Linear -> QATLinear keeps .weight: runs
        apply = convert_
    else:
        apply = _technique(name)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"Llama4ForCausalLM: .* no longer runs .*undone"):
        apply(model)
    assert dict(model.named_modules()) == modules and not hasattr(model, "quantization_config")
    assert hasattr(model, "qat_config") == (name == "convert")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model(IDS)  # still the float model, running


def test_finding8_the_same_model_quantizes_with_a_float_embedding():
    from distill_lab.quantization import Int8WeightOnlyConfig, quantize_

    model = _llama4()
    with torch.no_grad():
        ref = model(IDS).logits
    quantize_(model, Int8WeightOnlyConfig(embedding_bits=None))
    assert _rel(model, ref) < 0.02
