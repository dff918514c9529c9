"""Bring your own model: every technique on tiny random models of 11 Hugging Face families.

Each (family, entry point) cell of ``distill_lab.support`` is checked: a supported cell against
a reference (fake-quant model, zeroed weights, skipped blocks, the float function, a reload),
a refused cell for one clear ``ValueError`` naming the model class, raised before any change.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_lab import arch
from distill_lab.support import ENTRY_POINTS, FAMILY_CONFIGS, supported, support_markdown, tiny_model

FAMILIES = list(FAMILY_CONFIGS)
SEQ = 24  # longer than the sliding window (8) of Mistral, Gemma, Mixtral
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 250, (2, SEQ), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_refused(family, model, fn):
    """``fn`` raises one ValueError naming the model class and leaves the model untouched."""
    before = _state(model)
    with pytest.raises(ValueError, match=re.escape(type(model).__name__)):
        fn()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        f"{family}: the refusal changed the model"


def _fake_quant_reference(model, config):
    """A float copy whose weights (every Linear, the embedding, the head) are quantize-dequantized like ``config``."""
    from distill_lab.quantization import Int4WeightOnlyConfig, fake_quantize

    ref = copy.deepcopy(model)
    emb, head = ref.get_input_embeddings(), ref.get_output_embeddings()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and m is not head:
                if isinstance(config, Int4WeightOnlyConfig):
                    m.weight.copy_(fake_quantize(m.weight, config.bits, config.group_size, config.symmetric, -1))
                else:
                    m.weight.copy_(fake_quantize(m.weight, 8, None, True, -1))
        emb.weight.copy_(fake_quantize(emb.weight, 8, None, True, -1))
        if head.weight is not emb.weight:
            head.weight.copy_(fake_quantize(head.weight, 8, None, True, -1))
    return ref


# ------------------------------------------------------------------------------------------------ quantize_
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize(family, ids, tmp_path):
    from distill_lab.quantization import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig, load_quantized,
                                          quantize_, save_quantized)

    base = tiny_model(family)
    if not supported(family, "quantize"):
        _assert_refused(family, base, lambda: quantize_(base, Int8WeightOnlyConfig()))
        return
    float_logits = _logits(base, ids)
    for config, band in ((Int8WeightOnlyConfig(), 0.02), (Int4WeightOnlyConfig(group_size=32), 0.02), (Int8DynamicConfig(), 0.1)):
        model = copy.deepcopy(base)
        summary = quantize_(model, config)
        assert not summary.float_modules, f"{family}: {summary}"
        assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)], family
        ref = _logits(_fake_quant_reference(base, config), ids)
        got = _logits(model, ids)
        # close to the fake-quant model, and closer to it than the float model is
        assert _rel(got, ref) < band and _rel(got, ref) < _rel(float_logits, ref), (family, config)
        if isinstance(config, Int4WeightOnlyConfig):
            save_quantized(model, tmp_path / "q")
            assert torch.equal(_logits(load_quantized(tmp_path / "q", device="cpu"), ids), got)


def test_gemma_int8_embedding_keeps_the_scale(ids):
    """The ×sqrt(hidden) embedding scale survives quantization (and a reload)."""
    from distill_lab.quantization import Int8Embedding

    model = tiny_model("gemma2")
    emb = model.get_input_embeddings()
    q = Int8Embedding.from_float(emb)
    assert q.embed_scale == pytest.approx(8.0)
    assert _rel(q(ids), emb(ids)) < 0.01


# ------------------------------------------------------------------------------------------------ Wanda
def _wanda_reference(model, batches, config):
    """Sequential Wanda through whole-model forwards: block i's input norms come from the model with blocks < i pruned."""
    from distill_lab.pruning.masks import wanda_scores
    from distill_lab.pruning.selection import prunable_linears
    from distill_lab.pruning.unstructured import input_norms, keep_mask

    every = lambda module, name: True  # noqa: E731
    blocks = arch.decoder_blocks(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    for block in blocks:
        names = [f"{prefix[id(block)]}.{n}" for n in prunable_linears(block, every)]
        norms = input_norms(model, calibration=batches, filter_fn=every)
        linears = prunable_linears(model, every)
        for name in names:
            lin = linears[name]
            with torch.no_grad():
                lin.weight.mul_(keep_mask(lin.weight, wanda_scores(lin.weight, norms[name]), config))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_wanda_sequential(family, pattern, ids):
    from distill_lab.pruning import WandaConfig, prune_

    model = tiny_model(family)
    config = WandaConfig(sparsity=0.5) if pattern == "50%" else WandaConfig(pattern="2:4")
    if not supported(family, "wanda"):
        _assert_refused(family, model, lambda: prune_(model, config, calibration=[ids]))
        return
    ref = _wanda_reference(copy.deepcopy(model), [ids], config)
    report = prune_(model, config, calibration=[ids])
    blocks = {id(b) for b in arch.decoder_blocks(model)}
    block_names = [n for n, m in model.named_modules() if id(m) in blocks]
    block_linears = [n for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and any(n.startswith(b + ".") for b in block_names)]
    assert block_linears and set(block_linears) <= set(report), family
    assert all(abs(report[n] - 0.5) < 0.01 for n in block_linears), family
    assert torch.equal(_logits(model, ids), _logits(ref, ids)), family


# ------------------------------------------------------------------------------------------------ structured
def _zeroed_reference(model, heads, channels):
    """Zero the o_proj columns of removed query heads and the down_proj columns of removed channels."""
    ref = copy.deepcopy(model)
    ad = arch.adapter(ref)
    d = ad.head_dim
    with torch.no_grad():
        for block, hi, ci in zip(ad.blocks, heads, channels):
            o, down = ad.linear(block, "o")[0], ad.linear(block, "down")[0]
            drop_h = sorted(set(range(ad.heads)) - set(hi.tolist()))
            for h in drop_h:
                o.weight[:, h * d:(h + 1) * d] = 0
            drop_c = sorted(set(range(ad.intermediate)) - set(ci.tolist()))
            down.weight[:, drop_c] = 0
    return ref


def _skip_blocks(model, drop):
    """Make the blocks in ``drop`` return their input unchanged (a skipped-blocks reference)."""
    ref = copy.deepcopy(model)
    for i in drop:
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        arch.decoder_blocks(ref)[i].register_forward_hook(hook, with_kwargs=True)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_structured(family, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill_lab.pruning.structured import (StructuredConfig, block_influence, importance, prune_structured,
                                                select_channels, select_heads, select_layers)

    model = tiny_model(family)
    width = StructuredConfig(heads_keep=0.5, channels_keep=0.5)
    if not supported(family, "structured"):
        _assert_refused(family, model, lambda: prune_structured(model, width))
        return
    ad = arch.adapter(model)
    scores = importance(model, "l2_norm")
    heads, _ = select_heads(scores["heads"], scores["kv_groups"], 0.5, "query", ad.n_rep)
    channels = select_channels(scores["channels"], 0.5)
    small = prune_structured(model, width)
    assert type(small) is type(model)
    assert small.config.num_attention_heads == ad.heads // 2
    assert small.config.intermediate_size == ad.intermediate // 2
    want = _logits(_zeroed_reference(model, heads, channels), ids)
    torch.testing.assert_close(_logits(small, ids), want, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path / "w")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "w"), ids), _logits(small, ids))

    keep = select_layers(block_influence(model, [ids]), 0.67)
    short = prune_structured(model, StructuredConfig(layers_keep=0.67), calibration=[ids])
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert short.config.layer_types == [types[i] for i in keep]
    drop = [i for i in range(len(ad.blocks)) if i not in keep]
    torch.testing.assert_close(_logits(short, ids), _logits(_skip_blocks(model, drop), ids), rtol=1e-5, atol=1e-5)
    short.save_pretrained(tmp_path / "l")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "l"), ids), _logits(short, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_make_student(family, ids):
    from distill_lab.models import make_student

    model = tiny_model(family)
    if not supported(family, "make_student"):
        _assert_refused(family, model, lambda: make_student(model, "layer_drop", layers=[0, 2]))
        return
    student = make_student(model, "layer_drop", layers=[0, 2]).eval()
    assert type(student) is type(model)
    assert getattr(student.config, "sliding_window", None) == getattr(model.config, "sliding_window", None)
    drop = [i for i in range(model.config.num_hidden_layers) if i not in (0, 2)]
    torch.testing.assert_close(_logits(student, ids), _logits(_skip_blocks(model, drop), ids), rtol=1e-5, atol=1e-5)
    rand = make_student(model, "random", num_layers=2)
    assert type(rand) is type(model) and rand.config.num_hidden_layers == 2
    assert _logits(rand.eval(), ids).shape == (2, SEQ, model.config.vocab_size)


# ------------------------------------------------------------------------------------------------ GPTQ / AWQ / SmoothQuant / QAT
@pytest.mark.parametrize("family", FAMILIES)
def test_gptq(family, ids):
    from distill_lab.quantization import Int4WeightOnlyConfig, gptq_, quantize_

    model = tiny_model(family)
    config = Int4WeightOnlyConfig(group_size=32)
    if not supported(family, "gptq"):
        _assert_refused(family, model, lambda: gptq_(model, config, calibration=[ids], progress=False))
        return
    float_logits = _logits(model, ids)
    rtn = copy.deepcopy(model)
    quantize_(rtn, config)
    summary = gptq_(model, config, calibration=[ids], clip=False, progress=False)
    assert not summary.float_modules
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # on its own calibration batch GPTQ is no worse than round-to-nearest (with slack)
    assert _rel(_logits(model, ids), float_logits) < 1.5 * _rel(_logits(rtn, ids), float_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_and_awq_keep_the_float_function(family, ids):
    from distill_lab.quantization import (Int4WeightOnlyConfig, SmoothQuantConfig, awq_, collect_activation_stats,
                                          smooth_)

    model = tiny_model(family)
    if supported(family, "smoothquant"):
        model = model.double()  # float64: the function is kept to rounding, far below the tolerance
    stats = collect_activation_stats(model, [ids], progress=False)
    if not supported(family, "smoothquant"):
        _assert_refused(family, model, lambda: smooth_(model, SmoothQuantConfig(alpha=0.5), stats=stats))
        _assert_refused(family, model,
                        lambda: awq_(model, Int4WeightOnlyConfig(group_size=32), stats=stats, progress=False))
        return
    want = _logits(model, ids)
    smoothed = copy.deepcopy(model)
    scales = smooth_(smoothed, SmoothQuantConfig(alpha=0.5), stats=stats)
    assert len(scales) == 4 * len(arch.decoder_blocks(model))
    assert any((s - 1).abs().max() > 0.1 for s in scales.values())  # something really moved
    torch.testing.assert_close(_logits(smoothed, ids), want, rtol=1e-5, atol=1e-5)
    scaled = copy.deepcopy(model)
    awq_(scaled, Int4WeightOnlyConfig(group_size=32), stats=stats, grid=3, clip=False, progress=False)
    torch.testing.assert_close(_logits(scaled, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_then_int4(family, ids, tmp_path):
    from distill_lab.quantization import (Int4WeightOnlyConfig, awq_, collect_activation_stats, load_quantized,
                                          quantize_, save_quantized)

    if not supported(family, "awq"):
        pytest.skip("refusal checked in test_smoothquant_and_awq_keep_the_float_function")
    model = tiny_model(family)
    stats = collect_activation_stats(model, [ids], progress=False)
    config = Int4WeightOnlyConfig(group_size=32)
    awq_(model, config, stats=stats, grid=3, progress=False)
    ref = _logits(_fake_quant_reference(model, config), ids)
    quantize_(model, config)
    got = _logits(model, ids)
    assert _rel(got, ref) < 0.02
    save_quantized(model, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(tmp_path / "q", device="cpu"), ids), got)


@pytest.mark.parametrize("family", FAMILIES)
def test_qat(family, ids):
    from distill_lab.quantization.qat import convert_, prepare_qat_
    from distill_lab.quantization import Int4WeightOnlyConfig

    model = tiny_model(family)
    config = Int4WeightOnlyConfig(group_size=32)
    if not supported(family, "qat"):
        _assert_refused(family, model, lambda: prepare_qat_(model, config))
        return
    ref = _fake_quant_reference(model, config)
    prepare_qat_(model, config)
    # training forward: fake-quant Linears, float embedding
    ref_train = copy.deepcopy(ref)
    ref_train.get_input_embeddings().load_state_dict(model.get_input_embeddings().state_dict())
    if ref_train.get_output_embeddings().weight is not ref_train.get_input_embeddings().weight:
        ref_train.get_output_embeddings().load_state_dict(model.get_output_embeddings().state_dict())
    torch.testing.assert_close(_logits(model, ids), _logits(ref_train, ids), rtol=1e-4, atol=1e-4)
    summary = convert_(model)
    assert not summary.float_modules
    assert _rel(_logits(model, ids), _logits(ref, ids)) < 0.01


def test_qat_summary_lists_every_linear_left_in_float():
    from distill_lab.quantization.qat import convert_, prepare_qat_
    from distill_lab.quantization import Int4WeightOnlyConfig

    model = tiny_model("llama")  # intermediate 96: down_proj's inputs do not divide into groups of 64
    prepare_qat_(model, Int4WeightOnlyConfig(group_size=64))
    summary = convert_(model)
    assert sorted(summary.float_modules) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert "kept in float: none" not in repr(summary)


# ------------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts(family):
    from distill_lab.pipeline import logical_parameters

    model = tiny_model(family)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert arch.parameter_count(model.config) == real
    assert logical_parameters(model) == real


# ------------------------------------------------------------------------------------------------ table
def test_every_cell_is_declared():
    assert set(ENTRY_POINTS) == {"quantize", "wanda", "structured", "make_student", "gptq", "awq",
                                 "smoothquant", "qat", "params"}
    assert {f for f in FAMILIES if all(supported(f, e) for e in ENTRY_POINTS)} == set(arch.FAMILIES)


def test_byom_support_table_is_generated():
    byom = (ROOT / "docs" / "byom.md").read_text()
    assert support_markdown() in byom, "regenerate its table with: python -m distill_lab.support --markdown"


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.teacher
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_cli_compress_prune_distil_int4(family, teacher, tmp_path, capsys):
    """``python -m distill_lab compress --teacher <folder>`` on a tiny model saved with the teacher's tokenizer."""
    import distill_lab as dl
    from distill_lab.__main__ import main

    _, tokenizer = teacher
    model = tiny_model(family, vocab_size=len(tokenizer))
    src = tmp_path / family
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: byom\nsteps:\n  - prune: {channels_keep: 0.5, heads_keep: 0.5, layers_keep: 0.67}\n"
                      "  - distil: {steps: 2, batch_size: 2}\n  - quantize: {format: int4, group_size: 32}\n")
    out = tmp_path / "out"
    rc = main(["compress", "--recipe", str(recipe), "--out", str(out), "--teacher", str(src), "--profile", "smoke",
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "reloaded with distill_lab.load_model and generated" in captured.out
    small, _ = dl.load_model(out, device="cpu")
    assert type(small).__name__ == type(model).__name__
    assert small.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert len(small.config.layer_types) == 2
