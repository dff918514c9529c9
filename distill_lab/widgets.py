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


def recipe_panel(run, plot, heads_keep: float = 0.67, channels_keep: float = 0.5, layers_keep: float = 0.8,
                 distil_steps: int = 8, quantize: str = "int4", max_steps: int = 300):
    """Recipe knobs (prune, distil, quantize) that run ``run(**knobs)`` only when "Run recipe" is clicked, then ``plot``.

    ``run`` is a pure compute function (e.g. build a recipe from the knobs and call ``run_recipe``);
    ``plot`` draws its result. Nothing runs when a slider moves: a recipe takes minutes.
    """
    knobs = dict(
        heads_keep=widgets.Dropdown(options=[("9/9 heads", 1.0), ("6/9 heads", 0.67), ("3/9 heads", 0.34)],
                                    value=heads_keep, description="heads"),
        channels_keep=widgets.FloatSlider(value=channels_keep, min=0.1, max=1.0, step=0.05,
                                          description="MLP keep", continuous_update=False),
        layers_keep=widgets.FloatSlider(value=layers_keep, min=0.3, max=1.0, step=0.1,
                                        description="layers keep", continuous_update=False),
        distil_steps=widgets.IntSlider(value=distil_steps, min=0, max=max_steps, step=1,
                                       description="distil steps", continuous_update=False),
        quantize=widgets.Dropdown(options=["none", "int8", "w8a8", "int4"], value=quantize, description="quantize"),
    )
    return widgets.interactive(wire(run, plot), {"manual": True, "manual_name": "Run recipe"}, **knobs)
