"""llama.cpp as the third decode engine: its columns from injected timings (any machine), and for real where
llama-cpp-python is installed (skipped elsewhere: it builds from source, pip install 'distill_lab[deploy]')."""

import copy

import pytest
import torch

from distill_lab import llamacpp
from distill_lab.evaluate import compare_speed
from distill_lab.timing import SpeedRatio


def _teacher_vocab_tiny():
    from distill_lab.models import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128).eval()


def test_llamacpp_columns_from_injected_timings(tiny, monkeypatch, tmp_path):
    """The ratios' arithmetic on timings a machine we do not have might give: llama.cpp's decode of a
    model against the baseline's llama.cpp decode (like for like) and against its HF decode; a model
    without a GGUF file has no llama.cpp columns."""
    import distill_lab.evaluate.cost as cost

    made = []

    def fake_probe(path, prompt, decode_tokens, threads=None):
        made.append((str(path), tuple(prompt.shape), decode_tokens))
        return lambda: 0.0

    seconds = {("fp32", "prefill"): [4.0] * 3, ("fp32", "decode"): [2.0, 2.0, 2.2],
               ("fp32", "decode_llamacpp"): [1.0, 1.2, 1.0],
               ("int4", "prefill"): [2.0] * 3, ("int4", "decode"): [1.0, 1.0, 1.1],
               ("int4", "decode_llamacpp"): [0.2, 0.2, 0.2],
               ("other", "prefill"): [1.0] * 3, ("other", "decode"): [1.0] * 3}

    def fake_times(probes, repeats=3, warmup=1, progress=False):
        assert set(probes) == set(seconds)
        return {k: list(seconds[k]) for k in probes}

    monkeypatch.setattr(cost, "llamacpp_decode_probe", fake_probe)
    monkeypatch.setattr(cost, "interleaved_times", fake_times)
    gguf = {"fp32": tmp_path / "a.gguf", "int4": tmp_path / "b.gguf"}
    out = compare_speed({"fp32": tiny, "int4": tiny, "other": tiny}, batch=1, seq=8, decode_tokens=4,
                        baseline="fp32", gguf=gguf)
    assert made == [(str(gguf["fp32"]), (1, 32), 4), (str(gguf["int4"]), (1, 32), 4)]  # the HF decode's prompt
    r = out["int4"]
    assert r["decode_llamacpp_speedup"] == SpeedRatio.of_rounds([1.0, 1.2, 1.0], [0.2] * 3)
    assert r["decode_llamacpp_speedup"].median == pytest.approx(5.0)
    assert r["decode_llamacpp_hf_speedup"].median == pytest.approx(10.0)
    assert r["decode_llamacpp_tokens_per_s"] == pytest.approx(20.0)  # 4 tokens in 0.2 s
    assert out["fp32"]["decode_llamacpp_speedup"] == SpeedRatio(1.0, 1.0, 1.0, 3)
    assert not any(k.startswith("decode_llamacpp") for k in out["other"])


def test_compare_speed_gguf_arguments_are_checked(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"gguf names \['b'\]; allowed: names of models \['a'\]"):
        compare_speed({"a": tiny}, gguf={"b": tmp_path / "b.gguf"})
    with pytest.raises(ValueError, match="gguf with decode=False"):
        compare_speed({"a": tiny}, decode=False, gguf={"a": tmp_path / "a.gguf"})


def test_measure_speeds_says_why_llamacpp_was_not_timed(tiny, monkeypatch):
    import importlib

    from distill_lab.profiles import get_profile

    measure = importlib.import_module("distill_lab.pipeline.measure")  # the module, not the function
    monkeypatch.setattr(measure.llamacpp, "available", lambda: False)
    out = measure.measure_speeds({"m": tiny}, get_profile("smoke"), against=tiny, llama_cpp=True)
    for row in out.values():
        assert "llama-cpp-python is not installed" in row["decode_llamacpp_skipped"]
        assert "decode_llamacpp_tokens_per_s" not in row
    assert measure.speedup(out["m"], "decode_llamacpp") is None


def test_engine_refuses_a_missing_file_and_too_long_a_prompt(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'distill_lab[deploy]')")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        llamacpp.LlamaCppEngine(tmp_path / "missing.gguf")


def test_llamacpp_decodes_exported_models_in_the_same_rounds(tmp_path):
    """For real: a float and an int4 model exported to GGUF and timed by llama.cpp beside the other engines;
    llama.cpp's perplexity on the int4 model's file is ours within 1 % (same weights, two engines)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'distill_lab[deploy]')")
    from distill_lab.export import to_gguf
    from distill_lab.evaluate import perplexity
    from distill_lab.pipeline.measure import measure_speeds, speedup
    from distill_lab.profiles import get_profile
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_

    fp32 = _teacher_vocab_tiny()
    int4 = copy.deepcopy(fp32)
    quantize_(int4, Int4WeightOnlyConfig(group_size=32))
    out = measure_speeds({"int4": int4}, get_profile("smoke"), against=fp32, llama_cpp=True)
    assert out["__against__"]["decode_llamacpp_tokens_per_s"] > 0
    assert out["int4"]["decode_llamacpp_tokens_per_s"] > 0
    assert speedup(out["int4"], "decode_llamacpp").rounds == get_profile("smoke").repeats
    assert speedup(out["int4"], "decode_llamacpp_hf").median > 0
    path = tmp_path / "int4.gguf"
    to_gguf(int4, None, path)
    window = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(1))  # (1, T)
    engine = llamacpp.LlamaCppEngine(path, threads=1, n_ctx=64)
    assert engine.perplexity(window.tolist()) == pytest.approx(perplexity(int4, window), rel=0.01)
    with pytest.raises(ValueError, match="at most n_ctx=64"):
        engine.prefill_s(list(range(65)))
    assert engine.generate(window[0, :8].tolist(), 3)[:8] == window[0, :8].tolist()


def test_llamacpp_greedy_tokens_equal_ours_on_the_real_teacher(teacher, tmp_path):
    """The teacher int4 g64 everywhere, exported (Q4_1) and decoded greedily by llama.cpp: the same 12 tokens as
    our lean decoder, which gives model.generate's (test_decode). A decode probe that fed llama.cpp a wrong token
    (llama-cpp-python leaves ``scores`` at zero without logits_all) would time a different computation."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'distill_lab[deploy]')")
    from distill_lab.decode import StaticDecoder
    from distill_lab.export import to_gguf
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_

    model, tok = teacher
    int4 = copy.deepcopy(model)
    quantize_(int4, Int4WeightOnlyConfig(group_size=64, embedding_bits=4))
    to_gguf(int4, tok, tmp_path / "int4.gguf")
    ids = tok("The Python `with` statement is used to").input_ids
    ours = StaticDecoder(int4, max_len=64).generate(torch.tensor([ids]), 12)[0].tolist()
    engine = llamacpp.LlamaCppEngine(tmp_path / "int4.gguf", threads=2, n_ctx=64, logits_all=False)
    assert engine.generate(ids, 12) == ours
    with pytest.raises(ValueError, match="logits_all=True"):
        engine.nll(ids)
    engine.close()
