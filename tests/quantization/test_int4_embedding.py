"""embedding_bits=4: the int4 token embedding, its tied head on the int4 kernel (one copy), saving, sizes, GGUF."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.pipeline import Recipe
from distill_lab.pipeline.steps import QuantizeStep
from distill_lab.quantization import embeddings
from distill_lab.quantization.api import (
    KeptInFloat,
    Reason,
    compression_report,
    fp32_equivalent_bytes,
    memory_bytes,
    quantize_,
)
from distill_lab.quantization.configs import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    config_from_dict,
    config_to_dict,
)
from distill_lab.quantization.embeddings import INT4_EMBEDDING_GROUP, Int4Embedding
from distill_lab.quantization.kernels import use_kernels
from distill_lab.quantization.int4_kernels import dequantize_int4, int4_codes_and_scales
from distill_lab.quantization.modules import Int4WeightOnlyLinear, Int8Embedding
from distill_lab.quantization.primitives import fake_quantize, sqnr_db
from distill_lab.quantization.serialization import (
    QCONFIG_NAME,
    WEIGHTS_NAME,
    load_quantized,
    save_quantized,
)

from .helpers import tiny

CONFIG_TYPES = (Int8WeightOnlyConfig, Int8DynamicConfig, Int4WeightOnlyConfig)


def _embedding(v, d, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(v, d)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cls", CONFIG_TYPES, ids=lambda c: c.__name__)
def test_embedding_bits_accepts_none_8_4_and_names_a_bad_value_and_the_allowed_set(cls):
    for bits in (None, 8, 4):
        c = cls(embedding_bits=bits)
        assert config_from_dict(config_to_dict(c)) == c
    for bad in (5, 16, "4", True):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.embedding_bits={bad!r}; allowed: None \(.*\), 8 or 4"):
            cls(embedding_bits=bad)


def test_a_w8a8_head_cannot_be_an_int4_embeddings_head():
    with pytest.raises(ValueError, match=r"head='w8a8' with embedding_bits=4; allowed: head='weight_only'"):
        Int8DynamicConfig(head="w8a8", embedding_bits=4)


def test_pipeline_quantize_step_takes_embedding_bits_4_and_refuses_5():
    for fmt in ("int8", "w8a8", "int4"):
        assert QuantizeStep.from_knobs({"format": fmt, "embedding_bits": 4}).config.embedding_bits == 4
    assert Recipe("r", [{"quantize": {"format": "int4", "embedding_bits": 4}}]).steps
    with pytest.raises(ValueError, match=r"step 'quantize': .*embedding_bits=5; allowed: None .*, 8 or 4"):
        Recipe("r", [{"quantize": {"format": "int4", "embedding_bits": 5}}])


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-layout", "plain-layout"])
def test_lookup_equals_rows_of_the_dequantized_table(kernels):
    emb = _embedding(320, 128)
    with use_kernels(kernels):
        q = Int4Embedding.from_float(emb)
    assert q.layout == ("cpu" if kernels and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "plain")
    codes, sz = int4_codes_and_scales(emb.weight, INT4_EMBEDDING_GROUP, 4, symmetric=False)
    assert torch.equal(q.codes(), codes)  # the packed layout reads back to the codes it was given
    table = dequantize_int4(codes, INT4_EMBEDDING_GROUP, sz.to(torch.bfloat16), torch.float32)  # (V, D)
    assert torch.equal(q.dequantized_weight(), table)
    ids = torch.tensor([[0, 319, 5, 64], [63, 65, 5, 200]])
    out = q(ids)
    assert out.shape == (2, 4, 128) and out.dtype == emb.weight.dtype
    assert torch.equal(out, F.embedding(ids, table))


def test_a_lookup_dequantizes_only_the_looked_up_rows(monkeypatch):
    q = Int4Embedding.from_float(_embedding(512, 64))
    shapes = []
    real = embeddings.dequantize_int4

    def spy(codes, *args):
        shapes.append(tuple(codes.shape))
        return real(codes, *args)

    monkeypatch.setattr(embeddings, "dequantize_int4", spy)
    q(torch.tensor([[3, 7, 7]]))
    assert shapes == [(3, 64)]  # three rows, not the (512, 64) table


def test_int4_embedding_error_is_what_4_bit_groups_of_64_give():
    """Gaussian rows: min/max over 64 values spans ~4.8 sigma in 15 steps, so SQNR ~ 21 dB (measured 20.95)."""
    emb = _embedding(2048, 256)
    w = emb.weight.detach()
    got = sqnr_db(w, Int4Embedding.from_float(emb).dequantized_weight())
    assert 19.5 < got < 22.5
    reference = sqnr_db(w, fake_quantize(w, 4, INT4_EMBEDDING_GROUP, symmetric=False, axis=-1))  # fp32 grid
    assert abs(got - reference) < 0.25  # the bf16 scales and zeros cost almost nothing
    assert sqnr_db(w, Int8Embedding.from_float(emb).dequantized_weight()) > got + 15  # it really is 4 bits


def test_a_hidden_size_64_does_not_divide_keeps_embedding_and_head_in_float():
    model = tiny_llama()  # width 32
    summary = quantize_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    why = "embedding_dim=32 not divisible by the int4 embedding group size 64"
    assert summary.float_modules == {"model.embed_tokens": KeptInFloat(Reason.EMBEDDING_GROUP, why),
                                     "lm_head": KeptInFloat(Reason.EMBEDDING_GROUP, f"output head follows {why}")}
    assert "model.embed_tokens (embedding_dim=32 not divisible" in repr(summary)  # printed as before
    codes = torch.zeros(8, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match="embedding_dim=96 is not divisible by group_size=64"):
        Int4Embedding(codes, torch.zeros(1, 8, 2))


# ----------------------------------------------------------------------------- in a model, saved, reloaded
@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(group_size=32, embedding_bits=4),
                                    Int8WeightOnlyConfig(embedding_bits=4)], ids=repr)
def test_tied_head_shares_the_packed_codes_and_comes_back_tied_after_reload(config, tmp_path):
    model = tiny()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    q = copy.deepcopy(model)
    summary = quantize_(q, config)
    emb, head = q.model.embed_tokens, q.lm_head
    assert isinstance(emb, Int4Embedding) and isinstance(head, Int4WeightOnlyLinear) and summary.tied_head
    assert summary.replaced["int4_embedding"] == 1 and not summary.float_modules
    assert head.packed is emb.packed and head.scales_and_zeros is emb.scales_and_zeros  # stored once
    assert head.layout == emb.layout
    out = q(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.3
    save_quantized(q, tmp_path / "q")
    modules = json.loads((tmp_path / "q" / QCONFIG_NAME).read_text())["modules"]
    assert modules["lm_head"]["tied_to"] == "model.embed_tokens"
    with safe_open(str(tmp_path / "q" / WEIGHTS_NAME), framework="pt") as f:
        names = f.keys()
        assert names and not [k for k in names if k.startswith("lm_head.")]
        assert f.get_tensor("model.embed_tokens.packed").dtype == torch.uint8
    again = load_quantized(tmp_path / "q", device="cpu")
    e2, h2 = again.model.embed_tokens, again.lm_head
    assert h2.packed is e2.packed and h2.scales_and_zeros is e2.scales_and_zeros  # tied again: same tensors
    assert torch.equal(e2.codes(), emb.codes()) and torch.equal(e2.scales_and_zeros, emb.scales_and_zeros)
    assert torch.equal(again(ids).logits, out)  # identical logits


def test_an_untied_head_gets_its_own_int4_weights(tmp_path):
    model = tiny()
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = nn.Parameter(model.lm_head.weight * 0.5 + 0.01)
    summary = quantize_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    head = model.lm_head
    assert not summary.tied_head and isinstance(head, Int4WeightOnlyLinear)
    assert head.group_size == 64 and not head.symmetric and head.packed is not model.model.embed_tokens.packed
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids).logits
    save_quantized(model, tmp_path / "u")
    assert "tied_to" not in json.loads((tmp_path / "u" / QCONFIG_NAME).read_text())["modules"]["lm_head"]
    again = load_quantized(tmp_path / "u", device="cpu")
    assert again.lm_head.packed is not again.model.embed_tokens.packed
    assert torch.equal(again(ids).logits, out)


def test_size_on_disk_and_in_memory_is_the_packed_codes_scales_and_zeros_once(tmp_path):
    v, d = 32768, 64  # the embedding is ~97 % of this model
    model = tiny_llama(vocab_size=v, hidden_size=d, num_layers=1, intermediate_size=64, num_heads=4, num_kv_heads=2)
    fp32 = memory_bytes(model)
    summary = quantize_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    assert summary.replaced == {"int4_embedding": 1, "int4_weight_only": 8} and summary.tied_head
    table = v * d // 2 + (d // INT4_EMBEDDING_GROUP) * v * 2 * 2  # codes (2 per byte) + bf16 scales and zeros
    disk = save_quantized(model, tmp_path / "s").stat().st_size
    assert abs(disk / table - 1) < 0.05  # a second copy for the head, or unpacked codes, would double it
    assert abs(memory_bytes(model) / table - 1) < 0.05
    assert fp32_equivalent_bytes(model) == fp32  # the tied head's codes count once, as the fp32 table did
    report = compression_report(model)
    assert report["disk_bytes"] == disk and report["fp32_bytes"] == fp32 and report["ratio_disk"] > 7
    assert report["quantized_modules"] == {"int4_embedding": 1, "int4_weight_only": 8}


# ----------------------------------------------------------------------------- GGUF
def test_gguf_writes_the_int4_embedding_as_q4_1_with_our_codes(tmp_path):
    gguf = pytest.importorskip("gguf")
    from distill_lab.export import float_copy, read_gguf_tensors, to_gguf
    from distill_lab.models import load_gguf
    from distill_lab.quantization.ggml import int4_q4_1_parts

    model = tiny_llama(vocab_size=49152, hidden_size=64, num_layers=1, intermediate_size=128, num_heads=4,
                       num_kv_heads=2)
    quantize_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    try:
        report = to_gguf(model, None, tmp_path / "e.gguf")
    except (FileNotFoundError, ModuleNotFoundError):
        pytest.skip("the teacher's GGUF (its tokenizer) is not installed")
    assert report.tensor_types["token_embd.weight"] == "Q4_1" and "output.weight" not in report.tensor_types
    raw = read_gguf_tensors(tmp_path / "e.gguf", raw=True)["token_embd.weight"]  # (V, D/32·20)
    blocks = raw.reshape(raw.shape[0], -1, 20)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], -1)
    emb = model.model.embed_tokens
    np.testing.assert_array_equal(codes, emb.codes().numpy())  # the very codes, no second rounding
    m = int4_q4_1_parts(emb)[2]  # Q4_1 offsets: the one value rounded (to fp16)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(w, emb.dequantized_weight().numpy(), rtol=0, atol=float(np.abs(m).max()) * 2.0 ** -11)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact = float_copy(model)(ids).logits
        theirs = load_gguf(tmp_path / "e.gguf", tokenizer=False)[0](ids).logits
    torch.testing.assert_close(theirs, exact, rtol=0, atol=1e-3)
