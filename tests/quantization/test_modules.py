"""Tests for distill_lab.quantization.modules: each quantized layer type against its fake-quant reference."""

import copy
import io

import pytest
import torch
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.quantization import kernels, modules
from distill_lab.quantization.api import quantize_
from distill_lab.quantization.configs import Int4WeightOnlyConfig
from distill_lab.quantization.kernels import int_mm, onednn_int8_pack, use_kernels
from distill_lab.quantization.int4_kernels import int4_layout_for
from distill_lab.quantization.modules import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8Embedding,
                                              Int8WeightOnlyLinear, QuantizedModule, embedding_and_head, module_name,
                                              set_module)
from distill_lab.quantization.primitives import Granularity, fake_quantize

from .helpers import cuda, linear, tiny


@pytest.mark.parametrize("n,k,g", [(1536, 576, 64), (64, 128, 32), (48, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_module_packs_and_matches_dequantized_matmul(n, k, g, dtype, symmetric):
    lin = linear(n, k)
    mod = Int4WeightOnlyLinear.from_float(lin, g, 4, symmetric)
    assert mod.layout == int4_layout_for(torch.device("cpu"), n, k, g) == "cpu"
    assert mod.packed.numel() * mod.packed.element_size() == n * k // 2  # two codes per byte
    x = torch.randn(5, k).to(dtype)
    y = mod(x)
    ref = x.float() @ mod.dequantized_weight().t()
    assert y.dtype == dtype
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    # and the dequantized weight is quantize_tensor's grid (up to bf16 scales/zeros)
    deq = fake_quantize(lin.weight, 4, g, symmetric)
    assert ((mod.dequantized_weight() - deq).norm() / deq.norm()).item() < 1e-2


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_dynamic_matches_fake_quant_reference(granularity):
    lin = linear(40, 64, bias=True)
    mod = Int8DynamicLinear.from_float(lin, granularity)
    x = torch.randn(2, 9, 64)
    x[0, 0, 3] = 40.0  # an outlier
    axis = -1 if granularity == "per_token" else None
    xq = fake_quantize(x, 8, None, True, axis)
    ref = xq @ fake_quantize(lin.weight, 8, None, True, -1).t() + lin.bias
    torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4)


def test_int8_embedding():
    emb = nn.Embedding(50, 16)
    q = Int8Embedding.from_float(emb)
    ids = torch.tensor([[1, 2, 49]])
    torch.testing.assert_close(q(ids), fake_quantize(emb.weight, 8)[ids], rtol=1e-5, atol=1e-6)
    assert q.storage_bytes() == 50 * 16 + 50 * 4


@pytest.mark.parametrize("path", ["onednn", "chunked"])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_int8_dynamic_cpu_paths_are_bit_identical_to_the_plain_path(path, granularity, m, monkeypatch):
    """Issue 18: oneDNN's fused int8 linear and the in-place, row-chunked ``_int_mm`` epilogue both return
    exactly what quantize -> int_mm -> scale gave."""
    if path == "chunked":
        monkeypatch.setattr(modules, "onednn_int8_pack", lambda w: None)  # as on a CPU where oneDNN is not exact
    else:
        _onednn_or_skip(monkeypatch)
    monkeypatch.setattr(modules, "W8A8_CHUNK_ELEMENTS", 3 * 48)  # 3 rows per chunk: several chunks and a ragged end
    lin = linear(48, 64, bias=True)
    mod = Int8DynamicLinear.from_float(lin, granularity)
    mod.smooth = torch.rand(64) + 0.5
    x = torch.randn(2, m, 64) * 3
    x[0, 0, 5] = 80.0  # an outlier
    with torch.no_grad():
        got = mod(x)
        xq, sx = mod.quantize_input(x.reshape(-1, 64))  # the plain path, spelled out
        want = (torch.mul(int_mm(xq, mod.weight_int8.t()), mod.scales).mul_(sx) + mod.bias).reshape(2, m, 48)
        with use_kernels(False):
            fallback = mod(x)
    assert torch.equal(got, want) and torch.equal(got, fallback)
    assert mod(x.bfloat16()).dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)  # with autograd on, the plain (differentiable) path runs
    assert torch.equal(mod(xg).detach(), want)
    assert (mod._onednn is not None and mod._onednn[1] is not None) == (path == "onednn")  # the path that ran


def _onednn_or_skip(monkeypatch):
    """Skip where oneDNN's int8 linear is not exact here; else send every size to it."""
    if onednn_int8_pack(torch.ones(4, 8, dtype=torch.int8)) is None:
        pytest.skip("oneDNN's int8 linear is not available (or not exact) on this CPU")
    monkeypatch.setattr(modules, "W8A8_ONEDNN_MIN_ROWS", 1)
    monkeypatch.setattr(modules, "W8A8_ONEDNN_MIN_OUTPUTS", 1)
    monkeypatch.setenv("DISTILL_LAB_KERNELS", "fixed,w8a8.*=onednn")  # as where dispatch timed oneDNN faster


def test_onednn_int8_probe_refuses_a_kernel_that_is_not_exact(monkeypatch):
    """A oneDNN result that differs from ``_int_mm`` on the probe rows (a saturating non-VNNI CPU) is never used."""
    _onednn_or_skip(monkeypatch)
    real = kernels.onednn_int8_mm
    monkeypatch.setattr(kernels, "onednn_int8_mm", lambda xq, packed, s: real(xq, packed, s).clamp(-32768, 32767))
    w = torch.full((4, 64), 127, dtype=torch.int8)  # 64 · 127 · 127 = 1,032,256: a 16-bit sum would saturate
    assert onednn_int8_pack(w) is None
    lin = linear(16, 64)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    mod = Int8DynamicLinear.from_float(lin)
    x = torch.full((3, 64), 5.0)
    with torch.no_grad():
        got = mod(x)
    assert mod._onednn[1] is None  # refused: the _int_mm path ran
    with use_kernels(False):
        assert torch.equal(got, mod(x))
    monkeypatch.undo()
    assert onednn_int8_pack(w) is not None  # the real kernel is exact on the same weight


def test_int8_dynamic_onednn_copy_pickle_and_new_weights(monkeypatch):
    """The packed copy is not state: deepcopy and torch.save work, and new codes are packed again."""
    _onednn_or_skip(monkeypatch)
    lin = linear(32, 64, bias=True)
    mod = Int8DynamicLinear.from_float(lin)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = mod(x)
        assert mod._onednn[1] is not None
        twin = copy.deepcopy(mod)
        assert torch.equal(twin(x), y)
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)
        assert set(mod.state_dict()) == {"weight_int8", "scales", "bias"}  # the packed copy is not saved
        mod.weight_int8.neg_()  # in place: the version counter moves, so the weight is packed again
        xq, sx = mod.quantize_input(x)
        assert torch.equal(mod(x), torch.mul(int_mm(xq, mod.weight_int8.t()), mod.scales).mul_(sx) + mod.bias)
        other = Int8DynamicLinear.from_float(nn.Linear(64, 32))
        other.bias = None
        mod.bias = None
        mod.load_state_dict(other.state_dict())  # copied into the same tensor: packed again all the same
        assert torch.equal(mod(x), other(x))
    with torch.inference_mode():  # inference tensors have no version counter
        frozen = Int8DynamicLinear.from_float(lin)
        assert torch.equal(frozen(x), y)


def test_quantized_modules_report_storage():
    model = tiny()
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedModule)
    # codes in·out/2 bytes + (K/g)·N·2 bf16 scale/zero pairs
    assert q_proj.storage_bytes() == 64 * 64 // 2 + (64 // 32) * 64 * 2 * 2


@cuda
@pytest.mark.gpu
def test_cuda_int4_and_int8_match_cpu_reference():
    lin = linear(1536, 576)
    x = torch.randn(8, 576)
    cpu4 = Int4WeightOnlyLinear.from_float(lin, 64)
    gpu4 = copy.deepcopy(cpu4).repack("cuda")
    assert gpu4.layout == "cuda"
    torch.testing.assert_close(gpu4(x.cuda()).cpu(), cpu4(x), rtol=2e-2, atol=2e-2)
    w8 = Int8DynamicLinear.from_float(lin)
    g8 = copy.deepcopy(w8).cuda()
    torch.testing.assert_close(g8(x.cuda()).cpu(), w8(x), rtol=1e-3, atol=1e-3)
    wo = Int8WeightOnlyLinear.from_float(lin)
    torch.testing.assert_close(copy.deepcopy(wo).cuda()(x.cuda()).cpu(), wo(x), rtol=2e-2, atol=2e-2)


def test_int8_dynamic_granularities_read_every_spelling_and_name_bad_ones():
    lin = linear(16, 32)
    mod = Int8DynamicLinear.from_float(lin, "per-tensor", Granularity.PER_TENSOR)
    assert mod.act_granularity is Granularity.PER_TENSOR and mod.scales.unique().numel() == 1
    assert type(mod.spec()["act_granularity"]) is str and mod.spec()["act_granularity"] == "per_tensor"
    assert "W8A8 per_tensor activations" in mod.extra_repr()
    with pytest.raises(ValueError, match=r"Int8DynamicLinear.act_granularity='per_row'; allowed: 'per_token', "
                                         r"'per_tensor'"):
        Int8DynamicLinear.from_float(lin, "per_row")
    with pytest.raises(ValueError, match="weight_granularity='per_group'"):
        Int8DynamicLinear.from_float(lin, "per_token", "per_group")


def test_finding_and_swapping_modules_in_a_model():
    model = tiny_llama()
    emb, head = embedding_and_head(model)
    assert emb is model.model.embed_tokens and head is model.lm_head
    assert module_name(model, head) == "lm_head" and module_name(model, nn.Linear(2, 2)) is None
    assert module_name(model, None) is None and embedding_and_head(nn.Linear(2, 2)) == (None, None)
    q = Int8WeightOnlyLinear.from_float(model.model.layers[1].mlp.up_proj)
    set_module(model, "model.layers.1.mlp.up_proj", q)
    assert model.model.layers[1].mlp.up_proj is q and module_name(model, q) == "model.layers.1.mlp.up_proj"


def test_int8_dynamic_small_outputs_stay_on_int_mm(monkeypatch):
    """Decode-sized calls (few rows, or few outputs) never reach oneDNN, whose per-call cost is higher there,
    even where dispatch chose oneDNN for both phases."""
    monkeypatch.setenv("DISTILL_LAB_KERNELS", "fixed,w8a8.*=onednn")
    mod = Int8DynamicLinear.from_float(linear(192, 576))
    with torch.no_grad():
        mod(torch.randn(1, 576))  # 1 row: below W8A8_ONEDNN_MIN_ROWS
        mod(torch.randn(64, 576))  # 64 x 192 outputs: below W8A8_ONEDNN_MIN_OUTPUTS
    assert mod._onednn is None  # never even packed
    assert 64 * 192 < modules.W8A8_ONEDNN_MIN_OUTPUTS and modules.W8A8_ONEDNN_MIN_ROWS > 1
