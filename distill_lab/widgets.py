"""ipywidgets builders: each only wires a pure compute function to a plot function (no logic here).

Test a builder with ``w = builder(...)``; set ``w.children[i].value``; read ``w.result``.

Drawing is thread-safe on purpose. ipykernel 7 handles widget messages on a second thread (a
subshell), and ``ipywidgets.interactive`` asks matplotlib's inline backend to flush every pyplot
figure before and after each call. A figure made with ``plt.subplots`` inside a callback can
therefore be displayed from the other thread while it is still half-drawn (broken images, or the
figure lands in JupyterLab's log console). So every knob draws on a ``matplotlib.figure.Figure``
that pyplot never sees, finishes it, and only then shows it once, as a PNG, in its own ``Output``.
The same PNG path works under any backend (``agg`` in headless runs, inline in JupyterLab).
"""

from __future__ import annotations

import io

import ipywidgets as widgets
from IPython.display import Image, display
from matplotlib.figure import Figure

from .pipeline.report import STUDENT_PRUNE
from .plotting import (
    plot_distillation_view,
    plot_layer_pruning_view,
    plot_quantization_view,
    plot_sparsity_curve,
    plot_temperature_view,
)
from .quantization.configs import EMBEDDING_BITS
from .quantization.primitives import Granularity
from .views.baseline import temperature_view
from .views.combined import QUANTIZE_KNOBS
from .views.distillation import distillation_view
from .views.pruning import PRUNING_IMPORTANCE, layer_pruning_view, sparsity_curve_view
from .views.quantization import GRANULARITY_OPTIONS, quantization_view

__all__ = ["distillation_widget", "figure_png", "granularity_label", "layer_pruning_widget", "offscreen_axes",
           "quantization_widget", "recipe_panel", "show_figure", "SLIDER_WIDTH", "sparsity_widget",
           "temperature_widget", "wire"]

SLIDER_WIDTH = "720px"  # the whole control; its track stays >= 400 px beside the longest label and the readout
_STYLE = {"description_width": "initial"}  # full labels ("temperature", not "temperat...")


def _layout():
    return widgets.Layout(width=SLIDER_WIDTH)


def offscreen_axes(figsize=(6, 3.5), ncols: int = 1, **subplots_kw):
    """Axes of a new figure that pyplot does not track (no backend can show it before it is finished)."""
    fig = Figure(figsize=figsize)
    return fig.subplots(1, ncols, **subplots_kw)


def figure_png(fig, dpi: int = 100) -> bytes:
    """Render a finished figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def show_figure(fig) -> None:
    """Display a finished figure exactly once, as an ``image/png`` output (any matplotlib backend)."""
    display(Image(data=figure_png(fig)))


def wire(compute, plot, figsize=(6, 3.5), ncols: int = 1, **subplots_kw):
    """Return ``view(**knobs)``: ``result = compute(**knobs)``, ``plot(result, axes)`` offscreen, show it, return ``result``.

    ``plot`` takes the result and the axes to draw on (``ax`` or ``axes`` as second argument) and may
    display other things first (they land in the same ``Output``). ``view.draw(**knobs)`` returns
    ``(result, figure)`` without showing anything.
    """
    def draw(**knobs):
        result = compute(**knobs)
        axes = offscreen_axes(figsize, ncols, **subplots_kw)
        plot(result, axes)
        return result, (axes[0].figure if ncols > 1 else axes.figure)

    def view(**knobs):
        result, fig = draw(**knobs)
        show_figure(fig)  # only now, complete: see the module docstring
        return result

    view.draw = draw
    return view


def _interactive(view, knobs: dict, options: dict | None = None):
    """``widgets.interactive`` over ``view`` whose ``default_figure()`` redraws the builder's defaults."""
    defaults = {name: w.value for name, w in knobs.items()}
    w = widgets.interactive(view, options or {}, **knobs)
    # the figure of the builder's default knobs, by the same compute and plot functions (not shown)
    w.default_figure = lambda: view.draw(**defaults)[1]
    return w


def temperature_widget(logits, tokenizer, k: int = 10, value: float = 1.0):
    """Slider over sampling temperature that redraws the next-token distribution of ``logits`` (V,)."""
    slider = widgets.FloatSlider(value=value, min=0.1, max=4.0, step=0.05, description="temperature",
                                 continuous_update=False, style=_STYLE, layout=_layout())
    compute = lambda temperature: temperature_view(logits, tokenizer, temperature, k)  # noqa: E731
    return _interactive(wire(compute, plot_temperature_view), {"temperature": slider})


def recipe_panel(run, plot, heads_keep: float = 1.0, channels_keep: float = STUDENT_PRUNE["channels_keep"],
                 layers_keep: float = STUDENT_PRUNE.get("layers_keep", 1.0), distil_steps: int = 8,
                 quantize: str = "int4 QAT from AWQ + GPTQ", embedding_bits: int | None = 4, max_steps: int = 300):
    """Recipe knobs (prune, distil, quantize) that run ``run(**knobs)`` only when "Run recipe" is clicked, then ``plot``.

    ``run`` is a pure compute function (e.g. build a recipe from the knobs and call ``run_recipe``);
    ``plot(result, ax)`` draws its result on ``ax``. Nothing runs when a slider moves: a recipe takes minutes.
    The fractions are SmolLM2-135M's: 9 query heads, 1536 MLP channels (whole groups of 64), 30 blocks.
    """

    knobs = dict(
        heads_keep=widgets.Dropdown(options=[("9/9 heads", 1.0), ("6/9 heads", 0.67), ("3/9 heads", 0.34)],
                                    value=heads_keep, description="attention heads kept", style=_STYLE),
        channels_keep=widgets.SelectionSlider(  # multiples of 64 channels: int4 groups of 64 divide them
            options=[(f"{n * 64}/1536", round(n / 24, 4)) for n in range(2, 25)], value=channels_keep,
            description="MLP channels kept", continuous_update=False, style=_STYLE, layout=_layout()),
        layers_keep=widgets.SelectionSlider(
            options=[(f"{n}/30", round(n / 30, 4)) for n in range(9, 31)], value=layers_keep,
            description="blocks kept", continuous_update=False, style=_STYLE, layout=_layout()),
        distil_steps=widgets.IntSlider(value=distil_steps, min=0, max=max_steps, step=1,
                                       description="distillation steps", continuous_update=False,
                                       style=_STYLE, layout=_layout()),
        quantize=widgets.Dropdown(options=list(QUANTIZE_KNOBS), value=quantize, description="quantize",
                                  style=_STYLE),
        embedding_bits=widgets.Dropdown(options=[(label, bits) for bits, label in EMBEDDING_BITS.items()],
                                        value=embedding_bits, description="embedding + head", style=_STYLE),
    )
    return _interactive(wire(run, plot, figsize=(7.5, 4)), knobs, {"manual": True, "manual_name": "Run recipe"})


def distillation_widget(student_logits, teacher_logits, target: int, tokenizer, kd_temperature: float = 2.0,
                        alpha: float = 0.5, k: int = 8):
    """Sliders for the distillation temperature and alpha that redraw the softened distributions and loss terms."""
    t_slider = widgets.FloatSlider(value=kd_temperature, min=0.25, max=8.0, step=0.25, description="temperature T",
                                   continuous_update=False, style=_STYLE, layout=_layout())
    a_slider = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha (weight of KL)",
                                   continuous_update=False, style=_STYLE, layout=_layout())
    compute = lambda kd_temperature, alpha: distillation_view(  # noqa: E731
        student_logits, teacher_logits, target, tokenizer, kd_temperature, alpha, k)
    view = wire(compute, plot_distillation_view, figsize=(9, 3.5), ncols=2, gridspec_kw={"width_ratios": [2, 1]})
    return _interactive(view, {"kd_temperature": t_slider, "alpha": a_slider})


def granularity_label(granularity) -> str:
    """What a granularity option means: ``64`` -> ``"group of 64"``, ``PER_CHANNEL`` -> ``"per channel"``."""
    if isinstance(granularity, int):
        return f"group of {granularity}"
    return Granularity(granularity).value.replace("_", " ")  # also the spelling "per-channel"


def _same_granularity(option, value) -> bool:
    """Dropdown equality that also reads a granularity's other spellings ("per-channel" selects PER_CHANNEL)."""
    if isinstance(option, Granularity) and isinstance(value, str):
        try:
            return Granularity(value) is option
        except ValueError:
            return False
    return option == value


def quantization_widget(weight, bits: int = 4, granularity=Granularity.PER_CHANNEL, symmetric: bool = True):
    """Knobs for bits, granularity (per tensor, per channel, group size) and symmetry on a real (out, in) weight.

    ``granularity``: a ``Granularity`` (or its string, e.g. "per_channel" or "per-channel") or a group size.
    """

    if not isinstance(granularity, int):
        granularity = Granularity(granularity)
    options = [(granularity_label(g), g) for g in GRANULARITY_OPTIONS
               if not isinstance(g, int) or weight.shape[1] % g == 0]
    compute = lambda bits, granularity, symmetric: quantization_view(weight, bits, granularity, symmetric)  # noqa: E731
    knobs = dict(
        bits=widgets.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False,
                               style=_STYLE, layout=_layout()),
        granularity=widgets.Dropdown(options=options, value=granularity, description="scale shared by",
                                     equals=_same_granularity, style=_STYLE),
        symmetric=widgets.Checkbox(value=symmetric, description="symmetric", style=_STYLE))
    return _interactive(wire(compute, plot_quantization_view, figsize=(11, 3.5), ncols=2), knobs)


def sparsity_widget(curves: dict, sparsity: float = 0.5, importance: str = "wanda"):
    """Sparsity slider and importance picker that mark a point of precomputed perplexity-vs-sparsity curves (instant)."""
    slider = widgets.SelectionSlider(options=list(curves["sparsities"]), value=sparsity, description="sparsity",
                                     continuous_update=False, style=_STYLE, layout=_layout())
    picker = widgets.Dropdown(options=list(PRUNING_IMPORTANCE), value=importance, description="importance",
                              style=_STYLE)
    compute = lambda sparsity, importance: sparsity_curve_view(curves, sparsity, importance)  # noqa: E731
    return _interactive(wire(compute, plot_sparsity_curve), {"sparsity": slider, "importance": picker})


def layer_pruning_widget(weight, inputs, sparsity: float = 0.5, importance: str = "wanda", name: str = "layer"):
    """Sparsity slider and importance picker that prune one real layer live and redraw its output error (recomputed)."""
    slider = widgets.FloatSlider(value=sparsity, min=0.05, max=0.95, step=0.05, description="sparsity",
                                 readout_format=".0%", continuous_update=False, style=_STYLE, layout=_layout())
    picker = widgets.Dropdown(options=list(PRUNING_IMPORTANCE), value=importance, description="importance",
                              style=_STYLE)
    compute = lambda sparsity, importance: layer_pruning_view(weight, inputs, sparsity, importance, name)  # noqa: E731
    return _interactive(wire(compute, plot_layer_pruning_view, figsize=(10, 3.5), ncols=2),
                        {"sparsity": slider, "importance": picker})
