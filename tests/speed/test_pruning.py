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


def test_compare_speed_lean_decode_columns(tiny):
    """With lean=True every Llama row also holds the lean decoder's decode, timed in the same rounds."""
    out = compare_speed({"a": tiny, "b": tiny}, batch=1, seq=8, decode_tokens=2, repeats=3, warmup=0,
                        baseline="a", lean=True)
    for r in out.values():
        assert r["decode_lean_tokens_per_s"] > 0 and r["decode_lean_ms_per_token"] > 0
    assert out["a"]["decode_lean_speedup"] == SpeedRatio(1.0, 1.0, 1.0, 3)
    assert out["b"]["decode_lean_hf_speedup"].rounds == 3
    with pytest.raises(ValueError, match="lean=True with decode=False"):
        compare_speed({"a": tiny}, decode=False, lean=True)


def test_compare_speed_lean_ratios_from_injected_timings(tiny, monkeypatch):
    """The ratios' arithmetic, on timings a CPU we do not have might give: the lean decode of the
    model against the baseline's lean decode (like for like) and against its HF decode."""
    import distill_lab.evaluate.cost as cost
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    seconds = {("fp32", "prefill"): [4.0, 4.0, 4.0], ("fp32", "decode"): [2.0, 2.0, 2.2],
               ("fp32", "decode_lean"): [1.0, 1.1, 1.0],
               ("int4", "prefill"): [2.0, 2.0, 2.0], ("int4", "decode"): [1.0, 1.0, 1.1],
               ("int4", "decode_lean"): [0.25, 0.25, 0.25],
               ("qwen", "prefill"): [1.0] * 3, ("qwen", "decode"): [1.0] * 3}

    def fake_times(probes, repeats=3, warmup=1, progress=False):
        assert set(probes) == set(seconds)  # no lean probe for the model the lean decoder does not serve
        return {k: list(seconds[k]) for k in probes}

    monkeypatch.setattr(cost, "interleaved_times", fake_times)
    out = compare_speed({"fp32": tiny, "int4": tiny, "qwen": qwen}, batch=1, seq=8, decode_tokens=4,
                        baseline="fp32", lean=True)
    assert out["int4"]["decode_lean_speedup"] == SpeedRatio.of_rounds([1.0, 1.1, 1.0], [0.25] * 3)
    assert out["int4"]["decode_lean_speedup"].median == pytest.approx(4.0)
    assert out["int4"]["decode_lean_hf_speedup"].median == pytest.approx(8.0)
    assert out["int4"]["decode_lean_tokens_per_s"] == pytest.approx(16.0)  # 4 tokens in 0.25 s
    assert "decode_lean_speedup" not in out["qwen"] and "Llama" in out["qwen"]["decode_lean_skipped"]
