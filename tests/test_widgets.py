"""Every knob draws off pyplot and shows one complete PNG; layout a learner can use; the live pruning view."""

import matplotlib.pyplot as plt
import pytest
import torch

from distill_lab.views import pruning as P
from distill_lab import widgets as W


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


@pytest.fixture
def shown(monkeypatch):
    """Record the PNG of every figure a widget shows (outside a kernel ``display`` has nowhere to go)."""
    pngs = []
    monkeypatch.setattr(W, "show_figure", lambda fig: pngs.append(W.figure_png(fig)))
    return pngs


def _builders():
    from distill_lab.views.quantization import GRANULARITY_OPTIONS  # noqa: F401  (import check: the module loads)

    torch.manual_seed(0)
    logits = torch.linspace(-2, 2, 20)
    x = torch.randn(64, 128) * torch.cat([torch.full((4,), 50.0), torch.ones(124)])  # 4 loud inputs
    return {
        "temperature": lambda: W.temperature_widget(logits, _Tok(), k=5),
        "distillation": lambda: W.distillation_widget(torch.randn(20), torch.randn(20), 3, _Tok(), k=5),
        "quantization": lambda: W.quantization_widget(torch.randn(32, 128), granularity=64),
        "layer pruning": lambda: W.layer_pruning_widget(torch.randn(16, 128), x),
    }


@pytest.mark.parametrize("name", list(_builders()))
def test_each_knob_redraws_one_complete_png_without_pyplot(name, shown):
    plt.close("all")
    w = _builders()[name]()
    assert len(shown) == 1  # the default figure, shown once
    slider = w.children[0]
    assert float(slider.layout.width.rstrip("px")) >= 400 and slider.style.description_width == "initial"
    slider.value = slider.value + (slider.step if slider.value + slider.step <= slider.max else -slider.step)
    assert len(shown) == 2 and shown[1] != shown[0] and shown[1].startswith(b"\x89PNG")
    assert plt.get_fignums() == []  # nothing left in pyplot for a backend (or another thread) to flush
    fig = w.default_figure()
    assert len(shown) == 2 and W.figure_png(fig) == shown[0]  # not shown; same defaults, same picture


def test_recipe_panel_draws_only_on_click_and_labels_in_full(shown):
    runs = []

    def plot(result, ax):
        ax.plot([0, 1], [result, result])

    panel = W.recipe_panel(lambda **k: runs.append(k) or len(runs), plot)
    assert runs == [] and panel.children[0].description == "attention heads kept"
    panel.children[-2].click()
    assert len(runs) == 1 and len(shown) == 1 and plt.get_fignums() == []


def test_granularity_options_say_what_they_are():
    assert W.granularity_label(64) == "group of 64" and W.granularity_label("per-channel") == "per channel"


def test_layer_pruning_view_recomputes_and_wanda_protects_loud_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(256, 64)
    x[:, :4] *= 100  # four loud input features, as down_proj's inputs on the teacher
    v5 = P.layer_pruning_view(w, x, 0.5, "wanda")
    v7 = P.layer_pruning_view(w, x, 0.7, "magnitude")
    assert v5["errors"]["wanda"] < v5["errors"]["magnitude"]
    assert v7["errors"]["magnitude"] > v5["errors"]["magnitude"]  # more zeros, more error: recomputed, not looked up
    assert v5["pruned_abs"].numel() == 32 * 32 and v7["importance"] == "magnitude"
    with pytest.raises(ValueError, match="importance="):
        P.layer_pruning_view(w, x, 0.5, "taylor")


def test_linear_inputs_captures_one_layer(tiny):
    batches = [torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))]
    name = "model.layers.0.mlp.down_proj"
    x = P.linear_inputs(tiny, name, batches, max_tokens=10)
    lin = dict(tiny.named_modules())[name]
    assert x.shape == (10, lin.in_features) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="not an nn.Linear"):
        P.linear_inputs(tiny, "model.layers.0", batches)
