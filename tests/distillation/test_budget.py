"""The budget curve: evaluations at chosen steps, a run's points, the power-law fit and where it reaches 1.1."""

import math

import pytest

from distill_lab.distillation import DistillationLoss, TrainConfig, budget_curve, fit_power_law
from distill_lab.models import tiny_llama

from ._helpers import run, tiny_data


def test_fit_recovers_a_known_power_law():
    tokens = [1_000, 2_000, 4_000, 8_000, 16_000]
    ratios = [1 + 30.0 * t ** -0.6 for t in tokens]
    fit = fit_power_law(tokens, ratios)
    assert fit["b"] == pytest.approx(0.6, rel=1e-9) and fit["a"] == pytest.approx(30.0, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["points"] == 5
    # ratio - 1 = 0.1 where 30 t^-0.6 = 0.1: t = 300^(1/0.6)
    assert fit["tokens_to_target"] == pytest.approx(300 ** (1 / 0.6), rel=1e-9)


def test_fit_skips_points_at_or_below_the_teacher_and_refuses_too_few():
    fit = fit_power_law([1, 2, 4, 8], [3.0, 2.0, 1.0, 0.9])  # two usable points
    assert fit["points"] == 2 and math.isnan(fit["b"]) and math.isnan(fit["tokens_to_target"])
    rising = fit_power_law([1, 2, 4], [1.5, 2.0, 3.0])  # gets worse with more tokens: no reach
    assert math.isnan(rising["b"]) and math.isnan(rising["tokens_to_target"])
    with pytest.raises(ValueError, match="target=1.0"):
        fit_power_law([1, 2, 4], [3, 2, 1.5], target=1.0)


def test_eval_at_evaluates_after_exactly_those_steps_and_budget_curve_counts_tokens():
    train, val = tiny_data()
    teacher, student = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=2, seed=2)
    _, history = run(student, train, steps=8, teacher=teacher, val_windows=val, loss=DistillationLoss(1.0, 0.5),
                     cfg=dict(eval_at=(1, 2, 4), min_lr_ratio=1.0))
    assert [e["step"] for e in history["eval"]] == [0, 1, 2, 4, 8]
    points = budget_curve(history, teacher_ppl=10.0)
    per_step = 4 * 15  # 4 windows of 16 tokens: 15 positions with a next token each
    assert [p["tokens"] for p in points] == [per_step, 2 * per_step, 4 * per_step, 8 * per_step]
    assert [p["ratio"] for p in points] == [e["val_ppl"] / 10.0 for e in history["eval"][1:]]
    with pytest.raises(ValueError, match="teacher_ppl"):
        budget_curve(history, teacher_ppl=0)


@pytest.mark.parametrize("bad", [(0,), (9,), (2.5,), (True,)])
def test_eval_at_outside_the_run_is_refused(bad):
    with pytest.raises(ValueError, match=r"TrainConfig.eval_at=.*allowed: steps between 1 and steps=8"):
        TrainConfig(steps=8, eval_at=bad)
