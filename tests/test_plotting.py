"""distill_lab.plotting: the readability rules (log scale past 10x, legends, a true zero, fitted axes)."""

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402

from distill_lab.plotting import (plot_bars, plot_budget_curves, plot_pareto, plot_recipe_steps, plot_token_distribution,  # noqa: E402
                                  plot_topk_fidelity, wide_range)


def teardown_function():
    plt.close("all")


def test_wide_range_rule():
    assert wide_range([4.49, 829.0]) and not wide_range([1.0, 9.9]) and not wide_range([5.0])
    assert not wide_range([0.0, float("nan"), 3.0])  # zeros and NaN do not count


def test_bars_switch_to_log_only_past_10x():
    assert plot_bars({"a": 4.49, "b": 829.0}, "ppl ratio").axes[0].get_yscale() == "log"
    assert "log scale" in plot_bars({"a": 4.49, "b": 829.0}, "ppl ratio").axes[0].get_ylabel()
    assert plot_bars({"a": 650, "b": 1760}, "tokens/s").axes[0].get_yscale() == "linear"


def test_softened_distribution_is_not_squashed_against_one():
    fig = plot_token_distribution(["a", "b", "c"], [0.02, 0.015, 0.01], title="T = 4")
    assert fig.axes[0].get_xlim()[1] < 0.05


def test_topk_fidelity_has_a_legend_and_a_true_zero():
    rows = [{"k": k, "rel_error": e, "teacher_mass": m}
            for k, e, m in ((1, 0.55, 0.45), (64, 0.09, 0.88), (49152, 0.0, 1.0))]
    ax = plot_topk_fidelity(rows).axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert len(ax.get_legend().get_texts()) == 2  # both axes' series in one legend


def test_recipe_steps_and_pareto_use_log_for_wide_ratios():
    rows = [{"stage": s, "ppl_ratio_pydoc": r, "ppl_ratio_stdlib-code": r * 1.2, "size_bytes": 2**20}
            for s, r in (("teacher", 1.0), ("prune", 829.0), ("distil", 4.49))]
    assert plot_recipe_steps(rows).axes[0].get_yscale() == "log"
    points = [{"name": n, "size_mib": s, "ppl_ratio": r, "decode_ms": 10.0}
              for n, s, r in (("INT8", 129, 1.02), ("Distillation", 310, 47.6), ("Combined", 48.7, 5.41))]
    ax = plot_pareto(points).axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log" and ax.get_legend() is not None


def test_budget_curves_are_log_log_with_fit_lines_and_the_target():
    curves = {"KD": [{"tokens": t, "ratio": 1 + 20 * t ** -0.5} for t in (500, 1000, 2000, 4000)],
              "CE": [{"tokens": 500, "ratio": 0.9}]}  # at or below the teacher: nothing to draw on a log axis
    fits = {"KD": {"a": 20.0, "b": 0.5, "r2": 1.0, "points": 4, "tokens_to_target": 40_000.0}}
    ax = plot_budget_curves(curves, fits).axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "KD: fit b = 0.50" in labels and any("1.1" in t for t in labels)
    fit_line = next(line for line in ax.get_lines() if line.get_linestyle() == "--")
    assert fit_line.get_xdata()[-1] == 40_000.0  # drawn out to where it reaches ratio 1.1


def test_plot_accuracy_draws_each_model_per_task_with_error_bars_and_chance():
    from distill_lab.plotting import plot_accuracy

    res = {"teacher": {"mc": {"acc": 0.4, "acc_stderr": 0.03, "chance": 0.25}, "cloze": {"acc": 0.39, "acc_stderr": 0.03,
                                                                                         "chance": None}},
           "int4": {"mc": {"acc": 0.35, "acc_stderr": 0.03, "chance": 0.25}, "cloze": {"acc": 0.30, "acc_stderr": 0.03,
                                                                                      "chance": None}}}
    fig, ax = plt.subplots()
    assert plot_accuracy(res, ax=ax) is fig
    heights = sorted(round(p.get_height(), 2) for p in ax.patches)
    assert heights == [0.3, 0.35, 0.39, 0.4]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mc", "cloze"]
    assert len(ax.collections) >= 1 and "chance" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


def test_plot_speedups_groups_columns_per_model_with_iqr_and_gaps():
    from distill_lab.plotting import plot_speedups

    rows = {"INT8": {"prefill": (2.0, 1.9, 2.1), "decode, lean": None},
            "Combined": {"prefill": (1.5, 1.4, 1.6), "decode, lean": (4.2, 4.0, 4.4)}}
    fig, ax = plt.subplots()
    assert plot_speedups(rows, ax=ax) is fig
    assert sorted(round(p.get_height(), 1) for p in ax.patches) == [1.5, 2.0, 4.2]  # the missing one is a gap
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["prefill", "decode, lean"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["INT8", "Combined"]
    fig.savefig(__import__("io").BytesIO())
