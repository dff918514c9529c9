"""distill_lab.timing: the one timer (synchronised wall time, medians after warm-up)."""

import time

import pytest

from distill_lab.timing import SpeedRatio, interleaved_times, median_seconds, timed


def test_timed_measures_the_call():
    assert 0.04 <= timed(lambda: time.sleep(0.05)) < 1.0


def test_median_seconds_warms_up_then_takes_the_median():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.01)  # a slow first call: the warm-up absorbs it

    assert median_seconds(fn, repeats=3, warmup=1) < 0.1
    assert len(calls) == 4


def test_median_seconds_refuses_bad_counts():
    with pytest.raises(ValueError, match="repeats=0"):
        median_seconds(lambda: None, repeats=0)


def test_interleaved_times_keeps_every_round_in_order():
    order = []
    probes = {"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}
    times = interleaved_times(probes, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4  # round-robin, the warm-up round included but not kept
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3}


def test_speed_ratio_pairs_rounds_and_reports_the_spread():
    # a slow moment in round 2 hits both probes: paired, the ratio stays 2 in every round
    r = SpeedRatio.of_rounds([2.0, 8.0, 2.0, 2.0, 2.0], [1.0, 4.0, 1.0, 1.0, 1.0])
    assert (r.median, r.low, r.high, r.rounds) == (2.0, 2.0, 2.0, 5)
    r = SpeedRatio.of_rounds([1.0] * 5, [1 / 1.0, 1 / 1.2, 1 / 1.4, 1 / 1.6, 1 / 3.0])
    assert r.median == pytest.approx(1.4) and r.low == pytest.approx(1.2) and r.high == pytest.approx(1.6)
    assert f"{r}" == "1.40× (1.20–1.60)" and float(r) == pytest.approx(1.4)
    assert r.basis == "median of 5 alternating rounds, interquartile range in brackets"
    assert "no spread" in SpeedRatio(1.0, 1.0, 1.0, 1).basis
    assert f"{r:.1f}" == "1.4× (1.2–1.6)" and f"{r:>19}" == "  1.40× (1.20–1.60)"


@pytest.mark.parametrize("threshold, holds, mark", [(1.1, True, "✓"), (1.2, True, "✓"), (1.4, None, "within noise"),
                                                    (1.6, None, "within noise"), (1.7, False, "✗")])
def test_speed_ratio_verdict_says_within_noise_when_the_spread_crosses(threshold, holds, mark):
    r = SpeedRatio(1.4, 1.2, 1.6, 5)
    assert r.holds(threshold) is holds and r.mark(threshold) == mark


def test_speed_ratio_refuses_bad_input():
    with pytest.raises(ValueError, match="3 baseline rounds and 2 other"):
        SpeedRatio.of_rounds([1, 1, 1], [1, 1])
    with pytest.raises(ValueError, match="low <= median"):
        SpeedRatio(1.0, 1.5, 2.0, 3)
