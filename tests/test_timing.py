"""distill_lab.timing: the one timer (synchronised wall time, medians after warm-up)."""

import time

import pytest

from distill_lab.timing import median_seconds, timed


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
