"""Tests for the quantization lesson's views and plots (distill_lab.views.quantization, the knobs panel)."""

import matplotlib.pyplot as plt
import pytest
import torch

from distill_lab.plotting import (plot_activation_outliers, plot_channel_ranges, plot_loss_histories,
                                  plot_quantization_view)
from distill_lab.quantization.primitives import Granularity, dequantize, fake_quantize, quantize_tensor, sqnr_db
from distill_lab.views.quantization import GRANULARITY_OPTIONS, quantization_view, scale_layout
from distill_lab.widgets import granularity_label, quantization_widget


def test_quantization_view_and_widget():
    torch.manual_seed(0)
    w = torch.randn(32, 192)
    view = quantization_view(w, 4, 64, True)
    assert len(view["grid"]) == 15 and view["group_values"].numel() == 64
    assert view["sqnr_db"] == pytest.approx(sqnr_db(w, fake_quantize(w, 4, 64, True)))
    assert quantization_view(w, 8, "per-tensor", False)["group_values"].numel() == w.numel()
    plt.close(plot_quantization_view(view))
    panel = quantization_widget(w)
    bits, granularity, symmetric = panel.children[:3]
    assert 128 not in [value for _, value in granularity.options]  # 192 is not divisible by 128
    assert ("group of 64", 64) in granularity.options  # the option says what the number is
    bits.value, granularity.value, symmetric.value = 8, "per-channel", False  # the old spelling still selects
    assert panel.result["bits"] == 8 and panel.result["granularity"] is Granularity.PER_CHANNEL
    assert panel.result["sqnr_db"] > view["sqnr_db"] + 15
    plt.close("all")


def test_outlier_and_loss_plots():
    rows = [{"layer": f"model.layers.{i}.mlp.down_proj", "max_abs": 10.0 * (i + 1), "mean_abs": 0.1} for i in range(3)]
    for fig in (plot_activation_outliers(rows), plot_channel_ranges({"a": torch.rand(8)}),
                plot_loss_histories({"int4": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})):
        assert fig.axes
        plt.close(fig)


@pytest.mark.parametrize("granularity, layout", [
    (Granularity.PER_TENSOR, (None, None)), ("per_tensor", (None, None)), ("per-tensor", (None, None)),
    (Granularity.PER_CHANNEL, (None, -1)), ("per_channel", (None, -1)), ("per-channel", (None, -1)),
    (64, (64, -1)), ("64", (64, -1)),
])
def test_every_spelling_of_a_panel_choice_gives_the_same_grid(granularity, layout):
    assert scale_layout(granularity) == layout
    w = torch.randn(8, 128)
    q = quantize_tensor(w, 4, layout[0], True, layout[1])
    assert quantization_view(w, 4, granularity)["sqnr_db"] == sqnr_db(w, dequantize(q))


def test_panel_choices_and_their_labels():
    assert GRANULARITY_OPTIONS == (Granularity.PER_TENSOR, Granularity.PER_CHANNEL, 32, 64, 128)
    assert [granularity_label(g) for g in GRANULARITY_OPTIONS] == [
        "per tensor", "per channel", "group of 32", "group of 64", "group of 128"]
    for bad in ("per_group", "per_token"):
        with pytest.raises(ValueError, match=f"granularity='{bad}'; allowed: 'per_tensor', 'per_channel' or a group"):
            scale_layout(bad)
    panel = quantization_widget(torch.randn(16, 64), granularity="per-tensor")  # the old spelling as a default
    assert panel.children[1].value is Granularity.PER_TENSOR and panel.children[1].label == "per tensor"
    plt.close("all")
