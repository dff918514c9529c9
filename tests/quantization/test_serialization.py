"""Tests for distill_lab.quantization.serialization: save, reload (same logits), sizes on disk, file modes."""

import ast
import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_lab.quantization import serialization
from distill_lab.quantization.api import compression_report, memory_bytes, quantize_
from distill_lab.quantization.configs import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                                              config_from_dict)
from distill_lab.quantization.serialization import QCONFIG_NAME, load_quantized, save_quantized
from distill_lab.serialization import weights_bytes

from .helpers import SAMPLE_CONFIGS, tiny


@pytest.mark.parametrize("config", SAMPLE_CONFIGS, ids=lambda c: repr(c))
def test_quantize_model_save_and_reload(config, tmp_path):
    model = tiny()
    ids = torch.randint(0, 256, (2, 12))
    ref = model(ids).logits
    q = copy.deepcopy(model)
    summary = quantize_(q, config)
    assert summary.tied_head and not summary.float_modules
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in q.modules())
    assert q.lm_head.weight_int8 is q.model.embed_tokens.weight_int8  # tied: one copy
    out = q(ids).logits
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.5 if getattr(config, "bits", 8) == 3 else 0.25)
    path = save_quantized(q, tmp_path / "q")
    again = load_quantized(tmp_path / "q", device="cpu")
    unaligned = [n for n, b in again.named_buffers() if b.data_ptr() % 64]
    assert not unaligned, f"buffers at unaligned addresses crash the int8 CPU kernel: {unaligned}"
    torch.testing.assert_close(again(ids).logits, out)
    report = compression_report(q)
    assert report["disk_bytes"] == path.stat().st_size
    assert report["memory_bytes"] == memory_bytes(q)
    assert report["ratio_memory"] > 3.0 and report["fp32_bytes"] == memory_bytes(model)
    assert report["float_modules"] == []


def test_float_model_save_load_and_sizes(tmp_path):
    model = tiny()
    path = save_quantized(model, tmp_path / "f")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(path.stat().st_size - 4 * n_params) < 20_000  # fp32 tensors + a small header
    again = load_quantized(tmp_path / "f", device="cpu")
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_saved_model_is_readable_by_others(tmp_path):
    """Atomic writes go through mkdtemp (0700); the published folder gets the umask's usual modes."""
    umask = os.umask(0o022)
    try:
        model = tiny()
        quantize_(model, Int8WeightOnlyConfig())
        path = save_quantized(model, tmp_path / "shared")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in path.parent.iterdir())


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), Int8DynamicConfig(head="w8a8")], ids=repr)
def test_tied_head_is_written_once_and_tied_again(config, tmp_path):
    model = tiny()
    quantize_(model, config)
    path = save_quantized(model, tmp_path / "t")
    assert weights_bytes(model) == path.stat().st_size
    modules = json.loads((tmp_path / "t" / QCONFIG_NAME).read_text())["modules"]
    assert modules["lm_head"]["tied_to"] == "model.embed_tokens"
    again = load_quantized(tmp_path / "t", device="cpu")
    assert again.lm_head.weight_int8 is again.model.embed_tokens.weight_int8
    assert type(again.lm_head) is type(model.lm_head)


def test_a_checkpoint_saved_under_the_old_config_names_still_loads(tmp_path):
    """Files written before the rename name their config "Int4WeightOnly"; they load, and the config still reads."""
    model = tiny()
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    ids = torch.randint(0, 256, (1, 8))
    old = copy.deepcopy(model)
    old.quantization_config = {**model.quantization_config, "type": "Int4WeightOnly"}
    save_quantized(old, tmp_path / "old")
    again = load_quantized(tmp_path / "old", device="cpu")
    assert config_from_dict(again.quantization_config) == Int4WeightOnlyConfig(group_size=32)
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_serialization_sits_below_the_api():
    """Saving knows the module types only: no import of quantize_, AWQ or GPTQ (a package-level module later)."""
    tree = ast.parse(Path(serialization.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert imported and not imported & {"api", "awq", "gptq", "smoothquant"}
