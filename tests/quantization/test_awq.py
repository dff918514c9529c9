"""Tests for distill_lab.quantization.awq: awq_ keeps the float function and searches on its config's grid."""

import copy

import pytest
import torch

from distill_lab.quantization import awq
from distill_lab.quantization.awq import awq_
from distill_lab.quantization.configs import Int4WeightOnlyConfig, Int8WeightOnlyConfig
from distill_lab.quantization.smoothquant import collect_activation_stats
from distill_lab.summary import Summary

from .helpers import calibration, tiny


def test_awq_preserves_function_and_does_not_hurt_calibration_error():
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    stats = collect_activation_stats(model, calibration(), sample_tokens=64, progress=False)
    scaled = copy.deepcopy(model)
    config = Int4WeightOnlyConfig(group_size=32)
    chosen = awq_(scaled, config, stats=stats, grid=5, clip=False, progress=False)  # scaling alone: same function
    assert len(chosen) == 8 and all(0 <= a <= 1 for a in chosen.values())
    torch.testing.assert_close(scaled(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [Int4WeightOnlyConfig(group_size=32, bits=3),
                                    Int4WeightOnlyConfig(group_size=64, symmetric=True, bits=2)], ids=repr)
def test_awq_searches_and_clips_on_the_configs_grid(config, monkeypatch):
    """bits, group_size and symmetric all come from the one config (no loose keyword can disagree with it)."""
    seen = []
    search, clip = awq._quant_error, awq.clip_weight_

    def spy_search(x, weights, refs, s, bits, group_size, symmetric):
        seen.append(("search", bits, group_size, symmetric))
        return search(x, weights, refs, s, bits, group_size, symmetric)

    def spy_clip(weight, bits, group_size, symmetric, importance):
        seen.append(("clip", bits, group_size, symmetric))
        return clip(weight, bits, group_size, symmetric, importance)

    monkeypatch.setattr(awq, "_quant_error", spy_search)
    monkeypatch.setattr(awq, "clip_weight_", spy_clip)
    model = tiny()
    stats = collect_activation_stats(model, calibration(), sample_tokens=32, progress=False)
    awq_(model, config, stats=stats, grid=2, progress=False)
    grid = (config.bits, config.group_size, config.symmetric)
    assert {kind for kind, *_ in seen} == {"search", "clip"} and {tuple(g) for _, *g in seen} == {grid}


def test_awq_takes_the_config_first_and_the_calibration_by_keyword():
    model = tiny()
    stats = collect_activation_stats(model, calibration(), sample_tokens=32, progress=False)
    default, explicit = copy.deepcopy(model), copy.deepcopy(model)
    a = awq_(default, stats=stats, grid=3, progress=False)  # config=None: Int4WeightOnlyConfig() (g64)
    b = awq_(explicit, Int4WeightOnlyConfig(group_size=64), stats=stats, grid=3, progress=False)
    assert a == b and len(a) == 8 and isinstance(a, Summary) and a.technique == "awq_"
    c = awq_(copy.deepcopy(model), calibration=calibration(), grid=3, progress=False)  # token batches, as gptq_
    d = awq_(copy.deepcopy(model), stats=collect_activation_stats(model, calibration(), progress=False), grid=3,
             progress=False)
    assert dict(c) == dict(d)
    with pytest.raises(TypeError):
        awq_(model, Int4WeightOnlyConfig(), stats)  # calibration is keyword-only
    with pytest.raises(TypeError):
        awq_(model, stats, group_size=32)  # the old loose keywords are gone
    with pytest.raises(ValueError, match="allowed: an Int4WeightOnlyConfig"):
        awq_(model, Int8WeightOnlyConfig(), stats=stats)
    with pytest.raises(ValueError, match="pass precomputed ActivationStats as stats="):
        awq_(model, Int4WeightOnlyConfig(), calibration=stats)
    with pytest.raises(ValueError, match="not both"):
        awq_(model, Int4WeightOnlyConfig(), calibration=calibration(), stats=stats)
    with pytest.raises(ValueError, match="grid=1"):
        awq_(model, Int4WeightOnlyConfig(), stats=stats, grid=1)


def test_awq_clips_the_tied_int4_embedding_for_the_head_it_feeds():
    """With embedding_bits=4 the tied table's groups are clipped for the head's output error (weighted by the
    head input's E[x²]); with int8 rows (or clip=False) the table is left alone."""
    from distill_lab.models import tiny_llama
    from distill_lab.quantization.primitives import fake_quantize

    base = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        base.model.embed_tokens.weight[:, 5] *= 6  # outliers: a clipped range helps the other 63 values
    stats = collect_activation_stats(base, calibration(), sample_tokens=64, progress=False)
    table = base.model.embed_tokens.weight.detach().clone()
    for config, clip, changed in ((Int4WeightOnlyConfig(group_size=32, embedding_bits=4), True, True),
                                  (Int4WeightOnlyConfig(group_size=32, embedding_bits=8), True, False),
                                  (Int4WeightOnlyConfig(group_size=32, embedding_bits=4), False, False)):
        model = copy.deepcopy(base)
        awq_(model, config, stats=stats, grid=3, clip=clip, progress=False)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        assert (not torch.equal(model.model.embed_tokens.weight, table)) == changed
    model = copy.deepcopy(base)
    awq_(model, Int4WeightOnlyConfig(group_size=32, embedding_bits=4), stats=stats, grid=3, progress=False)
    x = stats.samples["lm_head"].float()  # (S, 64) the head's calibration inputs
    ref = x @ table.t()

    def head_error(w):
        return (x @ fake_quantize(w, 4, 64, False, axis=-1).t() - ref).pow(2).sum().item()

    assert head_error(model.lm_head.weight.detach()) < head_error(table)
