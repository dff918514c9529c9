"""Tests for distill_lab.views.pruning: the sparsity curve and its view, summaries."""

import json

import pytest
import torch

from distill_lab.views import pruning as V


def _calib(vocab=256, n=2, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def _fake_curves():
    return {"sparsities": [0.0, 0.3, 0.5], "magnitude": [10.0, 14.0, 90.0], "wanda": [10.0, 12.0, 20.0],
            "dense": 10.0}


def test_sparsity_curve_view_and_errors():
    v = V.sparsity_curve_view(_fake_curves(), 0.5, "wanda")
    assert v["ppl"] == 20.0 and v["other_ppl"] == 90.0 and v["ratio_to_dense"] == 2.0
    with pytest.raises(ValueError, match="sparsity"):
        V.sparsity_curve_view(_fake_curves(), 0.4)
    with pytest.raises(ValueError, match="importance="):
        V.sparsity_curve_view(_fake_curves(), 0.5, "taylor")


def test_sparsity_curve_on_tiny(tiny):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    curves = V.sparsity_curve(tiny, windows, _calib(), sparsities=(0.5,), progress=False, bf16=False)
    assert curves["sparsities"] == [0.0, 0.5] and len(curves["wanda"]) == len(curves["magnitude"]) == 2
    assert curves["wanda"][0] == curves["dense"]
    assert (tiny.model.layers[0].mlp.up_proj.weight != 0).all()  # the input model is untouched


def test_sparsity_widget_redraws():
    import matplotlib.pyplot as plt

    from distill_lab.widgets import sparsity_widget

    w = sparsity_widget(_fake_curves())
    assert w.result["ppl"] == 20.0
    w.children[1].value = "magnitude"
    assert w.result["ppl"] == 90.0
    w.children[0].value = 0.3
    assert w.result["ppl"] == 14.0
    plt.close("all")


def test_describe_and_to_json(tiny):
    c = tiny.config
    line = V.describe(tiny)
    assert line.startswith(f"{c.num_hidden_layers} layers, {c.num_attention_heads} query") and "M parameters" in line
    assert json.loads(V.to_json({"t": torch.tensor([1.0, 2.0]), "n": 3})) == {"t": [1.0, 2.0], "n": 3}
    with pytest.raises(TypeError):
        V.to_json({"x": object()})
