"""Matplotlib helpers for the lessons: each takes ``ax=None`` and returns the figure (never ``plt.show()``).

Readability rules every helper follows: axes name their quantity and unit; a value axis whose
positive values span more than 10x is drawn on a log scale (:func:`wide_range`); several series
get a legend; long tick labels are rotated, never overlapped.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["label_points", "plot_accuracy", "plot_activation_outliers", "plot_bars", "plot_speedups", "plot_budget_curves", "plot_channel_ranges",
           "plot_distillation_view", "plot_layer_pruning_view", "plot_loss_histories", "plot_pareto",
           "plot_quantization_view", "plot_recipe_steps", "plot_sparsity_curve", "plot_temperature_view",
           "plot_token_distribution", "plot_topk_fidelity", "plot_val_curves", "wide_range"]


def _axes(ax=None, figsize=(6, 3.5)):
    """Return ``(fig, ax)``: the given axes and its figure, or a new figure."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def wide_range(values, factor: float = 10.0) -> bool:
    """True when the positive values span more than ``factor`` times (then plot them on a log axis)."""
    pos = [float(v) for v in values if v == v and float(v) > 0]
    return len(pos) >= 2 and max(pos) > factor * min(pos)


def label_points(ax, xs, ys, names, fontsize: int = 8) -> list:
    """Name each point (x, y) beside it, trying six places around it and keeping the first that stays inside
    the axes and overlaps no other label and no point; returns the annotations. Call it after the figure's
    layout is final."""
    fig = ax.figure
    ax.get_xlim(), ax.get_ylim()  # settles the autoscaled limits, so data -> pixels is final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    places = [((6, 6), "left"), ((6, -12), "left"), ((-6, 6), "right"), ((-6, -12), "right"),
              ((0, 9), "center"), ((0, -16), "center")]
    points = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    legend = ax.get_legend()
    taken, out = ([legend.get_window_extent(renderer)] if legend is not None else []), []
    for (x, y), name, (px, py) in zip(zip(xs, ys), names, points):
        for offset, ha in places:
            note = ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, ha=ha, fontsize=fontsize)
            box = note.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clear = inside and not any(box.overlaps(b) for b in taken) and not any(
                box.x0 - 5 <= qx <= box.x1 + 5 and box.y0 - 5 <= qy <= box.y1 + 5
                for qx, qy in points if (qx, qy) != (px, py))
            if clear or (offset, ha) == places[-1]:  # the last place is kept even when crowded
                taken.append(box)
                out.append(note)
                break
            note.remove()
    return out


def plot_speedups(rows: dict[str, dict[str, tuple | None]], ax=None,
                  title: str = "Speed-up against the fp32 teacher", ylabel: str = "speed-up (x)"):
    """Grouped bars: for each row (a model), one bar per column (a phase or engine) at its median, the
    interquartile range as an error bar; ``None`` leaves a gap (not measured). A line marks 1x."""
    fig, ax = _axes(ax, figsize=(8, 3.8))
    names = list(rows)
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    width = 0.8 / max(len(columns), 1)
    x = np.arange(len(names))
    for j, col in enumerate(columns):
        vals = [rows[n].get(col) for n in names]
        xs = [x[i] + (j - (len(columns) - 1) / 2) * width for i, v in enumerate(vals) if v is not None]
        med = [v[0] for v in vals if v is not None]
        err = np.array([[v[0] - v[1], v[2] - v[0]] for v in vals if v is not None]).T.reshape(2, -1)
        bars = ax.bar(xs, med, width, yerr=err, capsize=2, label=col)
        for bar, m in zip(bars, med):
            ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x, names, rotation=10)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_token_distribution(tokens: list[str], probs, title: str = "", ax=None):
    """Horizontal bar chart of the most likely next tokens and their probabilities (axis fitted to them)."""
    fig, ax = _axes(ax)
    labels = [repr(t) for t in tokens][::-1]
    probs = [float(p) for p in probs][::-1]
    bars = ax.barh(labels, probs, color="tab:blue")
    for bar, p in zip(bars, probs):  # the axis is fitted to the bars, so print each value beside its bar
        ax.annotate(f"{p:.3f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    # fitted to the largest probability, not 0-1: a softened (T = 2, 4) distribution stays visible
    ax.set_xlim(0, 1.25 * max(probs + [1e-6]))
    ax.set_xlabel("probability (axis fitted to the top bar)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_bars(values: dict[str, float], xlabel: str = "", title: str = "", ax=None, fmt="{:.3g}",
              log: bool | None = None):
    """Bar chart of named values, each bar labelled with its number; log scale when they span > 10x."""
    fig, ax = _axes(ax)
    names, nums = list(values), list(values.values())
    bars = ax.bar(names, nums, color="tab:blue")
    for bar, v in zip(bars, nums):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if wide_range(nums) if log is None else log:
        ax.set_yscale("log")
        xlabel = f"{xlabel} (log scale)"
    ax.margins(y=0.12)  # room for the number above the tallest bar
    ax.set_ylabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_accuracy(results: dict[str, dict], ax=None, title: str = "Task accuracy (bars: ± 2 standard errors)"):
    """Grouped bars: each model's accuracy on each task, ± 2 standard errors, and the chance level dashed.

    ``results``: model name -> ``task_accuracy`` output (task -> ``{"acc", "acc_stderr", "chance"}``).
    """
    fig, ax = _axes(ax, figsize=(6, 3.5))
    models = list(results)
    tasks = list(next(iter(results.values()))) if results else []
    width = 0.8 / max(1, len(models))
    for m, name in enumerate(models):
        xs = [t + (m - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        accs = [results[name][task]["acc"] for task in tasks]
        errs = [2 * results[name][task]["acc_stderr"] for task in tasks]
        bars = ax.bar(xs, accs, width, yerr=errs, capsize=3, label=name)
        for bar, a in zip(bars, accs):
            ax.annotate(f"{a:.2f}", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center", va="bottom",
                        fontsize=8, color="white")
    for t, task in enumerate(tasks):
        chance = results[models[0]][task].get("chance")
        if chance is not None:
            ax.hlines(chance, t - 0.45, t + 0.45, colors="black", linestyles="dashed",
                      label="chance" if t == 0 else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
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
    front, best = [], float("inf")  # smallest ppl ratio reachable at each size or below
    for p in sorted(points, key=lambda q: q["size_mib"]):
        if p["ppl_ratio"] < best:
            best = p["ppl_ratio"]
            front.append(p)
    ax.step([p["size_mib"] for p in front], [p["ppl_ratio"] for p in front], where="post", ls="--",
            color="gray", zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 50, 100, 200: not 5×10^1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("size on disk (MiB, log scale)")
    ylabel = "perplexity ratio (student / teacher)"
    if wide_range(ratios):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ylabel += ", log scale"
    ax.set_ylabel(ylabel)
    ax.margins(x=0.15, y=0.15)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(sc, ax=ax, label="decode ms / token (batch 1)")
    fig.tight_layout()
    label_points(ax, sizes, ratios, [p["name"] for p in points])  # after the layout: no label overlaps another
    return fig


def plot_recipe_steps(rows: list[dict], ax=None, title: str = "Quality and size after each step"):
    """Perplexity ratio (in- and out-of-domain) after every recipe step, with size on disk on a second axis."""
    fig, ax = _axes(ax, figsize=(7, 3.8))
    stages = [r["stage"] for r in rows]
    x = range(len(rows))
    ax.plot(x, [r["ppl_ratio_pydoc"] for r in rows], "o-", label="ppl ratio, pydoc (in-domain)")
    ax.plot(x, [r["ppl_ratio_stdlib-code"] for r in rows], "s--", label="ppl ratio, stdlib code (out-of-domain)")
    ax.set_xticks(list(x), stages, rotation=15)
    ratios = [r[k] for r in rows for k in ("ppl_ratio_pydoc", "ppl_ratio_stdlib-code")]
    if wide_range(ratios):  # a pruned model at ~800x next to a healed one at ~4x
        ax.set_yscale("log")
        ax.set_ylabel("perplexity ratio to teacher (log scale)")
    else:
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


def plot_distillation_view(view: dict, axes=None):
    """Draw a ``distillation_view``: teacher vs student softened probabilities, and the weighted loss terms."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    ax, bx = axes
    fig = ax.figure
    y = np.arange(len(view["tokens"]))[::-1]
    ax.barh(y + 0.2, view["teacher_probs"], height=0.4, label="teacher", color="tab:blue")
    ax.barh(y - 0.2, view["student_probs"], height=0.4, label="student", color="tab:orange")
    ax.set_yticks(y, [repr(t) for t in view["tokens"]])
    ax.set_xlabel(f"probability at T = {view['kd_temperature']:.2f}")
    ax.set_title(f"teacher entropy {view['teacher_entropy_bits']:.2f} bits; target {view['target']!r}")
    ax.legend(loc="lower right")
    terms = {"α·T²·KL": view["kd_term"], "(1−α)·CE": view["ce_term"], "total": view["total"]}
    bx.bar(list(terms), list(terms.values()), color=["tab:blue", "tab:orange", "tab:gray"])
    bx.set_ylabel("loss (nats per token)")
    bx.set_title(f"loss terms (α = {view['alpha']:.2f})")
    fig.tight_layout()
    return fig


def plot_val_curves(histories: dict, teacher_ppl: float | None = None, ax=None):
    """Validation perplexity against optimizer steps for several runs (``{name: trainer history}``)."""
    fig, ax = _axes(ax, figsize=(7, 4))
    for name, history in histories.items():
        rows = history["eval"]
        ax.plot([r["step"] for r in rows], [r["val_ppl"] for r in rows], marker="o", label=name)
    if teacher_ppl is not None:
        ax.axhline(teacher_ppl, color="black", linestyle="--", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("Validation perplexity while training")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_topk_fidelity(rows: list[dict], ax=None):
    """Relative error of the cached-top-k distillation loss and the teacher mass kept, against k."""
    fig, ax = _axes(ax, figsize=(7, 3.5))
    ks = [r["k"] for r in rows]
    # a linear axis from a true zero: k = V (the live teacher) has no error at all, which a log axis cannot show
    ax.plot(ks, [100 * r["rel_error"] for r in rows], marker="o", color="tab:red",
            label="relative error of the KD term (%)")
    ax.set_xscale("log")
    ax.set_ylim(0, 105 * max([r["rel_error"] for r in rows] + [1e-9]))
    ax.set_xlabel("k (teacher logits kept per token, log scale)")
    ax.set_ylabel("relative error (%)", color="tab:red")
    bx = ax.twinx()
    bx.plot(ks, [r["teacher_mass"] for r in rows], marker="s", color="tab:blue", label="teacher mass kept")
    bx.set_ylabel("teacher probability mass kept", color="tab:blue")
    bx.set_ylim(0, 1.02)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = bx.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="center right", fontsize=8)
    ax.set_title("What a top-k teacher cache keeps and costs")
    fig.tight_layout()
    return fig


def plot_quantization_view(view: dict, axes=None):
    """Two panels for ``quantize.quantization_view``: one group's weights on its grid, and the error histogram."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    fig = axes[0].figure
    ax, ax2 = axes
    values = view["group_values"].numpy()
    ax.hist(values, bins=80, color="tab:blue", alpha=0.7)
    grid = view["grid"].numpy()
    for level in grid if len(grid) <= 64 else grid[:: max(1, len(grid) // 64)]:
        ax.axvline(level, color="tab:red", lw=0.6, alpha=0.6)
    ax.set_title(f"group with the largest |w| and its {len(grid)} levels", fontsize=10)
    ax.set_xlabel("weight value (red lines: the grid)")
    ax.set_ylabel("weights in the group")
    ax2.hist(view["errors"].numpy(), bins=80, color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_xlabel("dequantized - original weight")
    ax2.set_ylabel("weights of the layer (log)")
    sym = "symmetric" if view["symmetric"] else "asymmetric"
    gran = getattr(view["granularity"], "value", view["granularity"])  # an enum member, a string or a group size
    gran = f"g{gran}" if isinstance(gran, int) or str(gran).isdigit() else str(gran).replace("_", "-")
    ax2.set_title(f"int{view['bits']} {gran} {sym}: SQNR {view['sqnr_db']:.1f} dB, "
                  f"{8 * view['bytes_per_weight']:.2f} bits/weight", fontsize=10)
    fig.tight_layout()
    return fig


def plot_activation_outliers(rows: list[dict], ax=None, title: str = "Inputs of each Linear: max |x| and mean |x|"):
    """Per-layer max |x| (solid) and mean |x| (dotted) of every projection's input, log scale (rows of ``outlier_table``)."""
    fig, ax = _axes(ax, figsize=(9, 4))
    kinds = {"q_proj": "q/k/v (after input norm)", "o_proj": "o_proj (attention output)",
             "gate_proj": "gate/up (after post-attention norm)", "down_proj": "down_proj (SiLU(gate)·up)"}
    colors = dict(zip(kinds, ["tab:blue", "tab:green", "tab:purple", "tab:red"]))
    for kind, label in kinds.items():
        sel = [r for r in rows if r["layer"].endswith(kind)]
        if not sel:
            continue
        layers = [int(r["layer"].split(".")[2]) for r in sel]
        ax.plot(layers, [r["max_abs"] for r in sel], "-o", ms=3, color=colors[kind], label=label)
        ax.plot(layers, [r["mean_abs"] for r in sel], ":", color=colors[kind])
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("|x| (log; solid: max, dotted: mean)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_channel_ranges(curves: dict, ax=None, title: str = "max |x| per input channel"):
    """Per-channel activation ranges, one line per named (K,) tensor (e.g. before / after SmoothQuant)."""
    fig, ax = _axes(ax, figsize=(9, 3.5))
    for name, values in curves.items():
        ax.plot(values.float().numpy(), lw=0.8, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x| (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_histories(histories: dict, ax=None, title: str = "QAT: distillation loss per step"):
    """Training-loss curves, one per named history (lists of ``{"step", "loss"}``)."""
    fig, ax = _axes(ax)
    for name, history in histories.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set_xlabel("QAT step")
    ax.set_ylabel("KL(teacher ‖ student), nats (log)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sparsity_curve(view: dict, ax=None):
    """Test perplexity vs sparsity for magnitude and Wanda (log scale), the chosen point marked."""
    fig, ax = _axes(ax)
    curves = view["curves"]
    xs = [100 * s for s in curves["sparsities"]]
    for name, color in (("magnitude", "tab:red"), ("wanda", "tab:blue")):
        ax.plot(xs, curves[name], "o-", color=color, label=name, lw=2 if name == view["importance"] else 1,
                alpha=1.0 if name == view["importance"] else 0.5)
    ax.axhline(curves["dense"], color="gray", ls=":", label=f"dense ({curves['dense']:.1f})")
    ax.plot([100 * view["sparsity"]], [view["ppl"]], "k*", ms=14)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of every pruned Linear (%)")
    ax.set_ylabel("test perplexity (log)")
    ax.set_title(f"{view['importance']} at {100 * view['sparsity']:.0f}%: ppl {view['ppl']:.1f} "
                 f"({view['ratio_to_dense']:.2f}x dense)")
    ax.legend()
    fig.tight_layout()
    return fig



def plot_layer_pruning_view(view: dict, axes=None):
    """Two panels for ``views.pruning.layer_pruning_view``: output error of both methods, and the |W| kept vs pruned."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    ax, bx = axes
    fig = ax.figure
    names = list(view["errors"])
    ax.bar(names, [100 * view["errors"][n] for n in names], color=["tab:red", "tab:blue"],
           edgecolor=["black" if n == view["importance"] else "none" for n in names], linewidth=2)  # chosen: outlined
    for i, n in enumerate(names):
        ax.annotate(f"{100 * view['errors'][n]:.1f}%", (i, 100 * view["errors"][n]), ha="center", va="bottom")
    ax.set_ylim(0, 1.2 * max(100 * e for e in view["errors"].values()) or 1.0)  # room for the labels
    ax.set_ylabel("relative output error (%)")
    ax.set_title(f"{view['name']} at {100 * view['sparsity']:.0f}% sparsity", fontsize=10)
    hi = float(max(view["kept_abs"].max() if view["kept_abs"].numel() else 0, view["largest_pruned"])) or 1.0
    bins = [hi * i / 60 for i in range(61)]
    bx.hist(view["kept_abs"].numpy(), bins=bins, color="tab:gray", alpha=0.6, label="kept")
    bx.hist(view["pruned_abs"].numpy(), bins=bins, color="tab:red" if view["importance"] == "magnitude" else "tab:blue",
            alpha=0.8, label="pruned")
    bx.set_yscale("log")
    bx.set_xlabel("|W|")
    bx.set_title(f"{view['importance']}: largest pruned |W| = {view['largest_pruned']:.3f}", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_budget_curves(curves: dict, fits: dict | None = None, target: float = 1.1, ax=None):
    """Perplexity ratio minus 1 against training tokens, log-log, with each run's fitted power law.

    ``curves``: ``{name: [{"tokens", "ratio"}, ...]}`` (``distillation.budget_curve``); ``fits``:
    ``{name: fit_power_law(...)}``, drawn as dashed lines out to where they reach ``target``.
    """
    fig, ax = _axes(ax, figsize=(7.5, 4.2))
    fits = fits or {}
    for name, points in curves.items():
        pts = [(p["tokens"], p["ratio"] - 1) for p in points if p["ratio"] > 1]
        line = ax.plot([t for t, _ in pts], [e for _, e in pts], marker="o", label=name)[0]
        fit = fits.get(name)
        if fit and fit["b"] == fit["b"] and pts:  # not nan
            end = fit["tokens_to_target"] if fit["tokens_to_target"] == fit["tokens_to_target"] else pts[-1][0]
            xs = [pts[0][0] * (end / pts[0][0]) ** (i / 40) for i in range(41)]
            ax.plot(xs, [fit["a"] * x ** -fit["b"] for x in xs], linestyle="--", color=line.get_color(),
                    label=f"{name}: fit b = {fit['b']:.2f}")
    ax.axhline(target - 1, color="black", linestyle=":", label=f"ratio {target} (within {target - 1:.0%})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel("perplexity ratio − 1 (log scale)")
    ax.set_title("How far from the teacher, against the training budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
