"""How quality scales with the training budget: a run's curve, and a power law fitted to it.

A student's perplexity ratio to its teacher falls as it sees more training tokens. Over the range a
laptop can afford, the excess ``ratio - 1`` is close to a power law in the tokens ``D``
(Kaplan et al., 2020, arXiv:2001.08361, for loss against data; Busbridge et al., 2025,
arXiv:2502.08606, for distillation):

    ratio(D) - 1 ≈ a · D^(-b)        a straight line of slope -b on log-log axes

so a fit on a few cheap budgets says roughly how many tokens it would take to come within 10 % of
the teacher (``ratio = 1.1``). It is an extrapolation: the further it reaches beyond the measured
budgets, the less it is worth, and a student trained on the test's own domain can go *below* the
teacher (``ratio < 1``), where the form no longer applies (those points are left out of the fit).
"""

from __future__ import annotations

import math

__all__ = ["budget_curve", "fit_power_law"]


def budget_curve(history: dict, teacher_ppl: float) -> list[dict]:
    """The points ``{"step", "tokens", "ratio"}`` of a trainer history's evaluations after step 0.

    ``tokens`` are the training tokens that carried a loss up to that step (the history's own count,
    so an on-policy step counts only its generated tokens). Use a constant learning rate after the
    warm-up (``TrainConfig(schedule="warmup_cosine", min_lr_ratio=1.0)``) so that every point is a
    budget the run could have stopped at.
    """
    if not teacher_ppl > 0:
        raise ValueError(f"teacher_ppl={teacher_ppl!r}; allowed: a perplexity > 0")
    seen, total = {}, 0
    for row in history["train"]:
        total += row["tokens"]
        seen[row["step"]] = total
    return [{"step": e["step"], "tokens": seen[e["step"]], "ratio": e["val_ppl"] / teacher_ppl}
            for e in history["eval"] if e["step"] > 0]


def fit_power_law(tokens, ratios, target: float = 1.1) -> dict:
    """Least-squares fit of ``log(ratio - 1) = log(a) - b·log(tokens)``; where it reaches ``target``.

    Returns ``{"a", "b", "r2", "points", "tokens_to_target"}``. Points at or below ratio 1 cannot be
    on the line and are skipped (``points`` says how many were used); fewer than 3 usable points, or
    a curve that does not fall (``b <= 0``), give ``b = nan`` and ``tokens_to_target = nan``.
    """
    if not target > 1:
        raise ValueError(f"target={target!r}; allowed: a ratio > 1 (1.1 = within 10 % of the teacher)")
    pairs = [(math.log(t), math.log(r - 1)) for t, r in zip(tokens, ratios) if t > 0 and r > 1]
    nan = float("nan")
    if len(pairs) < 3:
        return {"a": nan, "b": nan, "r2": nan, "points": len(pairs), "tokens_to_target": nan}
    xs, ys = zip(*pairs)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    b = -slope
    reach = math.exp((intercept - math.log(target - 1)) / b) if b > 0 else nan
    return {"a": math.exp(intercept), "b": b if b > 0 else nan,
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else nan, "points": len(pairs), "tokens_to_target": reach}
