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
