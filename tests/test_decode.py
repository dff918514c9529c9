"""StaticDecoder: greedy tokens identical to HF generate (float, int4, pruned shapes), clear errors."""

import pytest
import torch

from distill_lab.decode import StaticDecoder
from distill_lab.models import tiny_llama
from distill_lab.quantization import Int4WeightOnlyConfig, quantize_


def _ids(vocab=256, n=7, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("quantized", [False, True])
def test_greedy_tokens_equal_hf_generate(quantized):
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    if quantized:
        quantize_(model, Int4WeightOnlyConfig(group_size=32))
    ids = _ids()
    dec = StaticDecoder(model, max_len=64)
    assert torch.equal(dec.generate(ids, 20), _hf(model, ids, 20))
    with torch.inference_mode():  # the prefill logits are the model's own
        torch.testing.assert_close(dec._forward(ids, 0), model(ids).logits[:, -1], rtol=0, atol=1e-5)
    assert dec.decode_s(ids, 3) > 0


def test_pruned_shapes_and_unfused_path():
    from distill_lab.pruning import StructuredConfig, prune_structured

    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    small = prune_structured(model, StructuredConfig(heads_keep=0.5, channels_keep=0.5)).eval()
    ids = _ids(seed=1)
    ref = _hf(small, ids, 12)
    assert torch.equal(StaticDecoder(small, max_len=32).generate(ids, 12), ref)
    assert torch.equal(StaticDecoder(small, max_len=32, fuse=False).generate(ids, 12), ref)


def _narrow_mlp(mlp, keep: int) -> None:
    """Keep the first ``keep`` channels of one block's MLP (a block narrower than the others)."""
    from torch import nn

    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, keep, bias=False)
        new.weight.data = old.weight.data[:keep].clone()
        setattr(mlp, name, new)
    old = mlp.down_proj
    new = nn.Linear(keep, old.out_features, bias=False)
    new.weight.data = old.weight.data[:, :keep].clone()
    mlp.down_proj = new


def test_pruned_int4_everywhere_student_greedy_equals_hf_generate():
    """The combined recipe's kind of model: fewer blocks (Block Influence), fewer heads and MLP channels, one block
    narrower than the others, then int4 everywhere (every block Linear, the embedding and its tied head)."""
    from distill_lab.pruning import StructuredConfig, prune_structured
    from distill_lab.quantization.modules import Int4WeightOnlyLinear

    model = tiny_llama(vocab_size=256, hidden_size=64, num_layers=6, intermediate_size=256, num_heads=4,
                       num_kv_heads=2)
    calibration = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))]
    small = prune_structured(model, StructuredConfig(layers_keep=0.67, heads_keep=0.5, channels_keep=0.75),
                             calibration=calibration).eval()
    assert len(small.model.layers) == 4 and small.model.layers[0].mlp.up_proj.out_features == 192
    _narrow_mlp(small.model.layers[1].mlp, 128)  # non-uniform widths: 192, 128, 192, 192
    quantize_(small, Int4WeightOnlyConfig(group_size=32, embedding_bits=4))
    assert all(isinstance(m, Int4WeightOnlyLinear) for layer in small.model.layers
               for m in (layer.self_attn.q_proj, layer.mlp.down_proj))
    assert type(small.model.embed_tokens).__name__ != "Embedding"  # the embedding (and tied head) is int4 too
    for seed in (1, 2):
        ids = _ids(seed=seed)
        ref = _hf(small, ids, 16)
        assert torch.equal(StaticDecoder(small, max_len=32).generate(ids, 16), ref)


def test_errors():
    model = tiny_llama()
    dec = StaticDecoder(model, max_len=16)
    with pytest.raises(ValueError, match="max_len=16"):
        dec.generate(_ids(n=10), 10)
    with pytest.raises(ValueError, match="batch size 2"):
        dec.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="Llama"):
        StaticDecoder(qwen)


@pytest.mark.teacher
def test_teacher_int4_greedy_equals_hf(teacher):
    import copy

    model, tok = teacher
    q4 = copy.deepcopy(model)
    quantize_(q4, Int4WeightOnlyConfig(group_size=64))
    ids = tok("The Python `with` statement is used to", return_tensors="pt").input_ids
    assert torch.equal(StaticDecoder(q4, max_len=128).generate(ids, 16), _hf(q4, ids, 16))


@pytest.mark.teacher
def test_teacher_width_student_int4_everywhere_greedy_equals_hf(teacher):
    """The combined recipe's shape on the real teacher: half of every block's MLP channels (768 of 1536), then int4
    g64 everywhere (blocks, embedding and tied head; AWQ and GPTQ change the codes, not the modules): the same
    greedy tokens."""
    from distill_lab.pruning import StructuredConfig, prune_structured

    model, tok = teacher
    ids = tok("The Python `with` statement is used to", return_tensors="pt").input_ids
    small = prune_structured(model, StructuredConfig(channels_keep=0.5, importance="l2_norm")).eval()
    quantize_(small, Int4WeightOnlyConfig(group_size=64, embedding_bits=4))
    assert small.model.layers[0].mlp.up_proj.out_features == 768
    assert type(small.model.embed_tokens).__name__ == "Int4Embedding"
    assert torch.equal(StaticDecoder(small, max_len=128).generate(ids, 16), _hf(small, ids, 16))


@pytest.mark.parametrize("quantized", [False, True])
def test_flat_decode_step_equals_the_general_step(quantized):
    """The decode step that calls the kernels directly gives the module path's logits and cache bit for bit."""
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    if quantized:
        quantize_(model, Int4WeightOnlyConfig(group_size=32))
    ids = _ids(n=9)
    flat, general = StaticDecoder(model, max_len=32), StaticDecoder(model, max_len=32)
    assert flat._flat is not None
    with torch.inference_mode():
        flat._forward(ids[:, :5], 0)
        general._forward(ids[:, :5], 0)
        for pos in range(5, 9):
            a = flat._forward(ids[:, pos:pos + 1], pos)
            b = general._general(ids[:, pos:pos + 1], pos)
            assert torch.equal(a, b)
    assert torch.equal(flat.k, general.k) and torch.equal(flat.v, general.v)


def test_flat_step_only_where_it_applies():
    model = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    assert StaticDecoder(model, max_len=16, fuse=False)._flat is None  # unfused: general step
    assert StaticDecoder(model.to(torch.bfloat16), max_len=16)._flat is None  # bf16 residual stream: general step
