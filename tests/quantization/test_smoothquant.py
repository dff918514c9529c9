"""Tests for distill_lab.quantization.smoothquant: activation statistics, outliers, and smooth_."""

import copy

import pytest
import torch

from distill_lab.quantization.api import quantize_
from distill_lab.quantization.configs import Int8DynamicConfig, SmoothQuantConfig
from distill_lab.quantization.smoothquant import ActivationStats, collect_activation_stats, outlier_table, smooth_

from .helpers import calibration, tiny


def test_activation_stats_and_outlier_table():
    model = tiny()
    stats = collect_activation_stats(model, calibration(), sample_tokens=32, progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert stats.absmax[name].shape == (128,) and stats.samples[name].shape == (32, 128)
    assert stats.tokens == 4 * 2 * 16
    rows = outlier_table(stats)
    assert len(rows) == 15 and all(r["max_abs"] >= r["mean_abs"] for r in rows)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_smoothquant_preserves_the_float_function(alpha):
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    stats = collect_activation_stats(model, calibration(), progress=False)
    scales = smooth_(model, SmoothQuantConfig(alpha), stats=stats)
    assert len(scales) == 2 * 4
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        smooth_(model, SmoothQuantConfig(1.5), stats=stats)


def test_smoothquant_helps_w8a8_with_an_outlier_channel():
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():  # plant an outlier channel in every block's MLP input and down_proj input
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[5] = 60.0
            layer.mlp.up_proj.weight[7] *= 80.0
    ids = torch.randint(0, 256, (4, 16))
    ref = model(ids).logits
    plain = copy.deepcopy(model)
    quantize_(plain, Int8DynamicConfig(embedding_bits=None))
    smoothed = copy.deepcopy(model)
    stats = collect_activation_stats(smoothed, calibration(), progress=False)
    smooth_(smoothed, SmoothQuantConfig(0.5), stats=stats)
    quantize_(smoothed, Int8DynamicConfig(embedding_bits=None))
    err_plain = (plain(ids).logits - ref).norm()
    err_smooth = (smoothed(ids).logits - ref).norm()
    assert err_smooth < err_plain


def test_smooth_takes_the_config_first_and_the_calibration_by_keyword():
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    stats = collect_activation_stats(model, calibration(), progress=False)
    assert isinstance(stats, ActivationStats)
    default, explicit = copy.deepcopy(model), copy.deepcopy(model)
    a = smooth_(default, stats=stats)  # config=None: SmoothQuantConfig() (alpha 0.5)
    b = smooth_(explicit, SmoothQuantConfig(alpha=0.5), stats=stats)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(default(ids).logits, explicit(ids).logits, rtol=0, atol=0)
    with pytest.raises(TypeError):
        smooth_(model, SmoothQuantConfig(), stats)  # calibration is keyword-only
    with pytest.raises(ValueError, match="calibration=None; allowed: token batches"):
        smooth_(model, SmoothQuantConfig())  # and required
    with pytest.raises(ValueError, match="allowed: a SmoothQuantConfig"):
        smooth_(model, Int8DynamicConfig(), stats=stats)  # the W8A8 config comes after, in quantize_
    with pytest.raises(ValueError, match="pass precomputed ActivationStats as stats="):
        smooth_(model, SmoothQuantConfig(), calibration=stats)
    c = smooth_(copy.deepcopy(model), calibration=calibration())  # token batches, as gptq_ takes them
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a) and c.technique == "smooth_"
    only_mlp = smooth_(copy.deepcopy(model), stats=stats, filter_fn=lambda m, name: ".mlp." in name)
    assert set(only_mlp) == {k for k in a if ".mlp." in k}  # a group is smoothed when filter_fn takes all its Linears
