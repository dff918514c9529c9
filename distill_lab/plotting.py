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


def plot_pareto(points: list[dict], ax=None, title: str = "Size vs quality (colour: decode latency)"):
    """Scatter size on disk (log x) against perplexity ratio, coloured by decode ms/token; the Pareto front dashed."""
    fig, ax = _axes(ax, figsize=(7, 4.2))
    sizes = [p["size_mib"] for p in points]
    ratios = [p["ppl_ratio"] for p in points]
    sc = ax.scatter(sizes, ratios, c=[p["decode_ms"] for p in points], cmap="viridis_r", s=70,
                    edgecolors="black", zorder=3)
    for p in points:
        ax.annotate(p["name"], (p["size_mib"], p["ppl_ratio"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    front, best = [], float("inf")  # smallest ppl ratio reachable at each size or below
    for p in sorted(points, key=lambda q: q["size_mib"]):
        if p["ppl_ratio"] < best:
            best = p["ppl_ratio"]
            front.append(p)
    ax.step([p["size_mib"] for p in front], [p["ppl_ratio"] for p in front], where="post", ls="--",
            color="gray", zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MiB, log scale)")
    ax.set_ylabel("perplexity ratio (student / teacher)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(sc, ax=ax, label="decode ms / token (batch 1)")
    fig.tight_layout()
    return fig


def plot_recipe_steps(rows: list[dict], ax=None, title: str = "Quality and size after each step"):
    """Perplexity ratio (in- and out-of-domain) after every recipe step, with size on disk on a second axis."""
    fig, ax = _axes(ax, figsize=(7, 3.8))
    stages = [r["stage"] for r in rows]
    x = range(len(rows))
    ax.plot(x, [r["ppl_ratio_pydoc"] for r in rows], "o-", label="ppl ratio, pydoc (in-domain)")
    ax.plot(x, [r["ppl_ratio_stdlib-code"] for r in rows], "s--", label="ppl ratio, stdlib code (out-of-domain)")
    ax.set_xticks(list(x), stages, rotation=15)
    ax.set_ylabel("perplexity ratio to teacher")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax2 = ax.twinx()
    ax2.bar(list(x), [r["size_bytes"] / 2**20 for r in rows], alpha=0.2, color="tab:green", label="size MiB")
    ax2.set_ylabel("size on disk (MiB)")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    lines, labels = ax.get_legend_handles_labels()
    bars, blabels = ax2.get_legend_handles_labels()
    ax.legend(lines + bars, labels + blabels, fontsize=8, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    return fig
