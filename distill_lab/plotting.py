"""Matplotlib helpers for the lessons: each takes ``ax=None`` and returns the figure (never ``plt.show()``)."""

from __future__ import annotations

import matplotlib.pyplot as plt


def _axes(ax=None, figsize=(6, 3.5)):
    """Return ``(fig, ax)``: the given axes and its figure, or a new figure."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_token_distribution(tokens: list[str], probs, title: str = "", ax=None):
    """Horizontal bar chart of the most likely next tokens and their probabilities."""
    fig, ax = _axes(ax)
    labels = [repr(t) for t in tokens][::-1]
    ax.barh(labels, list(probs)[::-1], color="tab:blue")
    ax.set_xlabel("probability")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_bars(values: dict[str, float], xlabel: str = "", title: str = "", ax=None, fmt="{:.3g}"):
    """Bar chart of named values, each bar labelled with its number."""
    fig, ax = _axes(ax)
    names, nums = list(values), list(values.values())
    bars = ax.bar(names, nums, color="tab:blue")
    for bar, v in zip(bars, nums):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_temperature_view(view: dict, ax=None):
    """Draw a ``temperature_view`` result: the top tokens at one temperature, titled with T and entropy."""
    return plot_token_distribution(view["tokens"], view["probs"], ax=ax,
                                   title=f"T = {view['temperature']:.2f}   "
                                         f"entropy = {view['entropy_bits']:.2f} bits")
