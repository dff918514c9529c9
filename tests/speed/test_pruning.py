"""Tests for distill_lab.speed.pruning: the 2:4 kernel timing and interleaved model timing."""

import copy

import pytest
import torch

from distill_lab.pruning.unstructured import MagnitudeConfig, prune_
from distill_lab.evaluate import compare_speed
from distill_lab.speed.pruning import semi_structured_speed
from distill_lab.timing import SpeedRatio


def test_semi_structured_speed_on_this_device():
    r = semi_structured_speed(256, 128, 64, repeats=2)
    assert r["dense_s"] > 0 and r["sparse_24_s"] > 0 and r["speedup_24"].rounds == 2
    if not torch.cuda.is_available():
        assert "no 2:4 sparse kernel on the CPU" in r["kernel"]
        assert "csr_s" in r


def test_compare_speed_times_every_model(tiny):
    pruned = copy.deepcopy(tiny)
    prune_(pruned, MagnitudeConfig(0.5))
    out = compare_speed({"dense": tiny, "pruned": pruned}, batch=1, seq=8, decode_tokens=2, repeats=1, warmup=0)
    assert list(out) == ["dense", "pruned"]
    for r in out.values():
        assert r["prefill_s"] > 0 and r["prefill_tokens_per_s"] == 8 / r["prefill_s"]
        assert r["decode_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0
        # one round: the per-token ratio of the two phases is exactly the ratio of their tokens/s
        assert r["prefill_per_decode_token"].median == pytest.approx(
            r["prefill_tokens_per_s"] / r["decode_tokens_per_s"])
    no_decode = compare_speed({"dense": tiny}, batch=1, seq=8, repeats=1, warmup=0, decode=False)["dense"]
    assert no_decode["prefill_s"] > 0 and no_decode["decode_tokens_per_s"] != no_decode["decode_tokens_per_s"]  # NaN
    assert "prefill_per_decode_token" not in no_decode


def test_compare_speed_ratios_against_the_baseline_round_by_round(tiny):
    # the same model twice: every round's ratio is near 1, and the baseline's own ratio is exactly 1
    out = compare_speed({"a": tiny, "b": tiny}, batch=1, seq=8, decode_tokens=2, repeats=5, warmup=0,
                        baseline="a", bf16={"a": False, "b": False})
    assert out["a"]["prefill_speedup"] == SpeedRatio(1.0, 1.0, 1.0, 5)
    assert out["b"]["decode_speedup"].rounds == 5 and 0 < out["b"]["decode_speedup"].low
    with pytest.raises(ValueError, match="baseline='c'"):
        compare_speed({"a": tiny}, baseline="c")
