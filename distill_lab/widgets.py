"""ipywidgets builders: each only wires a pure compute function to a plot function (no logic here).

Test a builder with ``w = builder(...)``; set ``w.children[i].value``; read ``w.result``.
"""

from __future__ import annotations

import ipywidgets as widgets


def wire(compute, plot):
    """Return ``view(**knobs)``: ``result = compute(**knobs)``, ``plot(result)``, return ``result``."""
    def view(**knobs):
        result = compute(**knobs)
        plot(result)
        return result
    return view


def temperature_widget(logits, tokenizer, k: int = 10, value: float = 1.0):
    """Slider over sampling temperature that redraws the next-token distribution of ``logits`` (V,)."""
    from .evaluate import temperature_view
    from .plotting import plot_temperature_view

    slider = widgets.FloatSlider(value=value, min=0.1, max=4.0, step=0.05, description="temperature",
                                 continuous_update=False)
    compute = lambda temperature: temperature_view(logits, tokenizer, temperature, k)  # noqa: E731
    return widgets.interactive(wire(compute, plot_temperature_view), temperature=slider)


def recipe_panel(run, plot, heads_keep: float = 0.67, channels_keep: float = 0.375, layers_keep: float = 0.8,
                 distil_steps: int = 8, quantize: str = "int4 + AWQ", max_steps: int = 300):
    """Recipe knobs (prune, distil, quantize) that run ``run(**knobs)`` only when "Run recipe" is clicked, then ``plot``.

    ``run`` is a pure compute function (e.g. build a recipe from the knobs and call ``run_recipe``);
    ``plot`` draws its result. Nothing runs when a slider moves: a recipe takes minutes.
    """
    from .pipeline import QUANTIZE_KNOBS

    knobs = dict(
        heads_keep=widgets.Dropdown(options=[("9/9 heads", 1.0), ("6/9 heads", 0.67), ("3/9 heads", 0.34)],
                                    value=heads_keep, description="heads"),
        channels_keep=widgets.SelectionSlider(  # multiples of 64 channels: int4 groups of 64 divide them
            options=[(f"{n * 64}/1536", n / 24) for n in range(2, 25)], value=channels_keep,
            description="MLP keep", continuous_update=False),
        layers_keep=widgets.FloatSlider(value=layers_keep, min=0.3, max=1.0, step=0.1,
                                        description="layers keep", continuous_update=False),
        distil_steps=widgets.IntSlider(value=distil_steps, min=0, max=max_steps, step=1,
                                       description="distil steps", continuous_update=False),
        quantize=widgets.Dropdown(options=list(QUANTIZE_KNOBS), value=quantize, description="quantize"),
    )
    return widgets.interactive(wire(run, plot), {"manual": True, "manual_name": "Run recipe"}, **knobs)


def distillation_widget(student_logits, teacher_logits, target: int, tokenizer, temperature: float = 2.0,
                        alpha: float = 0.5, k: int = 8):
    """Sliders for the distillation temperature and alpha that redraw the softened distributions and loss terms."""
    from .distill import distillation_view
    from .plotting import plot_distillation_view

    t_slider = widgets.FloatSlider(value=temperature, min=0.25, max=8.0, step=0.25,
                                   description="temperature", continuous_update=False)
    a_slider = widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="alpha",
                                   continuous_update=False)
    compute = lambda temperature, alpha: distillation_view(  # noqa: E731
        student_logits, teacher_logits, target, tokenizer, temperature, alpha, k)
    return widgets.interactive(wire(compute, plot_distillation_view), temperature=t_slider, alpha=a_slider)


def quantization_widget(weight, bits: int = 4, granularity="per-channel", symmetric: bool = True):
    """Knobs for bits, granularity (per-tensor, per-channel, group size) and symmetry on a real (out, in) weight."""
    from .plotting import plot_quantization_view
    from .quantize import GRANULARITIES, quantization_view

    options = [g for g in GRANULARITIES if not isinstance(g, int) or weight.shape[1] % g == 0]
    compute = lambda bits, granularity, symmetric: quantization_view(weight, bits, granularity, symmetric)  # noqa: E731
    return widgets.interactive(
        wire(compute, plot_quantization_view),
        bits=widgets.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False),
        granularity=widgets.Dropdown(options=options, value=granularity, description="granularity"),
        symmetric=widgets.Checkbox(value=symmetric, description="symmetric"))


def sparsity_widget(curves: dict, sparsity: float = 0.5, method: str = "wanda"):
    """Sparsity slider and method picker that redraw precomputed perplexity-vs-sparsity curves (instant)."""
    from .plotting import plot_sparsity_curve
    from .prune import sparsity_curve_view

    slider = widgets.SelectionSlider(options=list(curves["sparsities"]), value=sparsity, description="sparsity",
                                     continuous_update=False)
    picker = widgets.Dropdown(options=["magnitude", "wanda"], value=method, description="method")
    compute = lambda sparsity, method: sparsity_curve_view(curves, sparsity, method)  # noqa: E731
    return widgets.interactive(wire(compute, plot_sparsity_curve), sparsity=slider, method=picker)

