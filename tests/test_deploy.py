"""benchmarks/deploy.py: the engines agree with distill_lab's own perplexity; llama.cpp parts skip without it."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _deploy():
    spec = importlib.util.spec_from_file_location("deploy_bench", ROOT / "benchmarks" / "deploy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torch_engine_perplexity_matches_evaluate(tiny):
    from distill_lab.evaluate import perplexity

    deploy = _deploy()
    windows = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    got = deploy.perplexity(deploy.TorchEngine(tiny), windows.tolist())
    assert math.isclose(got, perplexity(tiny, windows), rel_tol=1e-4)
    e = deploy.TorchEngine(tiny)
    assert e.decode_s(windows[0].tolist(), 3) > 0 and e.prefill_s(windows[0].tolist()) > 0


def test_install_hint_names_the_extra():
    deploy = _deploy()
    assert "distill_lab[deploy]" in deploy.INSTALL_HINT and "cmake ninja" in deploy.INSTALL_HINT


def test_llama_cpp_runs_an_exported_tiny_model(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'distill_lab[deploy]')")
    from distill_lab.export import to_gguf
    from distill_lab.models import tiny_llama
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_

    deploy = _deploy()
    model = tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128)
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    path = tmp_path / "t.gguf"
    to_gguf(model, None, path)
    window = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = deploy.perplexity(deploy.TorchEngine(model), [window])
    theirs = deploy.perplexity(deploy.LlamaCppEngine(path, threads=1, n_ctx=128), [window])
    assert abs(theirs / ours - 1) < 0.01
