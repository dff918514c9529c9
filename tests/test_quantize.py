"""Tests for distill_lab.quantize, smoothquant, gptq and qat: references, kernels, save/load, sizes."""

import copy
import math

import pytest
import torch
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.quantize import (Int4WeightOnly, Int4WeightOnlyLinear, Int8Dynamic, Int8DynamicLinear,
                                  Int8Embedding, Int8WeightOnly, Int8WeightOnlyLinear, QuantizedModule,
                                  compression_report, config_from_dict, config_to_dict, dequantize,
                                  fake_quantize, int4_codes_and_scales, int4_layout_for, int_mm,
                                  load_quantized, memory_bytes, pack_int4, quantization_error, quantize_,
                                  quantize_tensor, save_quantized, sqnr_db, unpack_int4, use_kernels)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------- independent references
def ref_per_row_absmax(w, bits):
    qmax = 2 ** (bits - 1) - 1
    out_codes, out_scales = [], []
    for row in w.double():
        s = row.abs().max() / qmax
        s = s if s > 0 else torch.tensor(1.0, dtype=torch.float64)
        out_codes.append(torch.clamp(torch.round(row / s), -qmax, qmax))
        out_scales.append(s)
    return torch.stack(out_codes), torch.stack(out_scales)


def ref_groupwise(w, bits, g, symmetric):
    """Loop over rows and groups: codes, scales, zeros (min) computed one group at a time."""
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.float64)
    scales = torch.zeros(n, k // g, dtype=torch.float64)
    zeros = torch.zeros(n, k // g, dtype=torch.float64)
    for i in range(n):
        for j in range(k // g):
            block = w[i, j * g:(j + 1) * g].double()
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = block.abs().max() / qmax
                codes[i, j * g:(j + 1) * g] = torch.clamp(torch.round(block / s), -qmax, qmax)
            else:
                qmax = 2 ** bits - 1
                lo, hi = block.min(), block.max()
                s = (hi - lo) / qmax
                codes[i, j * g:(j + 1) * g] = torch.clamp(torch.round((block - lo) / s), 0, qmax)
                zeros[i, j] = lo
            scales[i, j] = s
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_row_absmax_matches_reference(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 40)
    q = quantize_tensor(w, bits, None, True, -1)
    codes, scales = ref_per_row_absmax(w, bits)
    assert q.codes.dtype == torch.int8 and q.scales.shape == (16, 1)
    torch.testing.assert_close(q.scales.double().reshape(-1), scales, rtol=1e-6, atol=0)
    # codes may differ only where w/s lands within float rounding of a .5 tie
    assert (q.codes.double() != codes).float().mean() < 1e-3


@pytest.mark.parametrize("bits,g,symmetric", [(4, 8, True), (4, 16, False), (3, 8, False), (8, 32, True),
                                              (2, 16, False)])
def test_groupwise_matches_reference(bits, g, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 64) * 0.05 + 0.01
    q = quantize_tensor(w, bits, g, symmetric, -1)
    codes, scales, zeros = ref_groupwise(w, bits, g, symmetric)
    assert q.scales.shape == (6, 64 // g)
    torch.testing.assert_close(q.scales.double(), scales, rtol=1e-5, atol=1e-9)
    assert (q.codes.double() != codes).float().mean() < 1e-3
    if not symmetric:
        torch.testing.assert_close(q.zero_points.double(), zeros, rtol=0, atol=1e-7)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    else:
        assert q.zero_points is None


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_round_trip_within_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(bits)
    w = torch.randn(12, 32) * torch.rand(12, 1) * 3
    q = quantize_tensor(w, bits, group_size, symmetric, -1)
    err = (dequantize(q) - w).abs()  # (12, 32)
    g = group_size or 32
    step = q.scales.repeat_interleave(g, dim=-1)  # (12, 32)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_axis_and_per_tensor():
    w = torch.randn(8, 6, 10)
    q = quantize_tensor(w, 8, 3, True, axis=1)  # groups of 3 along dim 1
    assert q.codes.shape == w.shape and q.scales.shape == (8, 2, 10)
    assert torch.allclose(dequantize(q), w, atol=q.scales.max().item() / 2 + 1e-6)
    qt = quantize_tensor(w, 8, None, True, axis=None)
    assert qt.scales.shape == (1, 1, 1)
    assert math.isclose(qt.scales.item(), w.abs().max().item() / 127, rel_tol=1e-6)


def test_error_metrics():
    w = torch.randn(64, 64)
    assert sqnr_db(w, w) == math.inf
    noisy = w + 0.1 * torch.randn_like(w)
    m = quantization_error(w, noisy)
    assert m["mse"] == pytest.approx(((w - noisy) ** 2).mean().item(), rel=1e-5)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10((w ** 2).sum() / ((w - noisy) ** 2).sum()), rel=1e-5)
    # more bits, less noise: about 6 dB per bit
    s4 = sqnr_db(w, fake_quantize(w, 4, 16, True))
    s8 = sqnr_db(w, fake_quantize(w, 8, 16, True))
    assert 20 < s8 - s4 < 28


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(4, 8)
    assert torch.equal(fake_quantize(w, 4, 4, True), w)
    c = torch.full((4, 8), 0.3)
    assert torch.equal(fake_quantize(c, 4, 4, False), c)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(group_size=7), "group_size"), (dict(group_size=0), "group_size"),
    (dict(axis=5), "axis"), (dict(axis=None, group_size=4), "group_size"),
])
def test_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(torch.randn(4, 8), **kwargs)


def test_value_errors_for_bad_tensors():
    with pytest.raises(ValueError, match="empty"):
        quantize_tensor(torch.empty(0, 8))
    with pytest.raises(ValueError, match="floating"):
        quantize_tensor(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnly(group_size=7)
    with pytest.raises(ValueError, match="bits"):
        Int4WeightOnly(bits=5)
    with pytest.raises(ValueError, match="act_granularity"):
        Int8Dynamic(act_granularity="per_row")
    with pytest.raises(ValueError, match="embedding_bits"):
        Int8WeightOnly(embedding_bits=4)
    with pytest.raises(ValueError, match="config"):
        quantize_(tiny_llama(), "int8")


def test_q4_1_grid_is_reproduced_exactly():
    """Weights that already lie on an asymmetric 4-bit group-32 grid (GGML Q4_1) re-quantize losslessly."""
    torch.manual_seed(0)
    n, k, g = 8, 128, 32
    d = (torch.rand(n, k // g) * 0.02 + 0.001).half().float()  # fp16 block scales, as in the file
    m = (-torch.rand(n, k // g) * 0.1).half().float()  # fp16 block minimums
    q = torch.randint(0, 16, (n, k))
    q[:, ::g], q[:, 1::g] = 0, 15  # each block uses its full range, as Q4_1's own rounding does
    w = q.float() * d.repeat_interleave(g, 1) + m.repeat_interleave(g, 1)
    re = quantize_tensor(w, 4, 32, symmetric=False)
    assert torch.equal(re.codes.long(), q)
    assert sqnr_db(w, dequantize(re)) > 100
    assert sqnr_db(w, fake_quantize(w, 4, 64, symmetric=False)) < 40  # a grid that does not coincide


# ----------------------------------------------------------------------------- packing and kernels
def test_pack_unpack_int4():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def _linear(n, k, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 4)  # rows of different magnitude
    return lin


@pytest.mark.parametrize("n,k,g", [(1536, 576, 64), (64, 128, 32), (48, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_module_packs_and_matches_dequantized_matmul(n, k, g, dtype, symmetric):
    lin = _linear(n, k)
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


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_equals_fallback(bits):
    lin = _linear(64, 192, seed=bits, bias=True)
    fast = Int4WeightOnlyLinear.from_float(lin, 64, bits, False)
    codes, sz = int4_codes_and_scales(lin.weight, 64, bits, False)
    slow = Int4WeightOnlyLinear(codes, sz, 64, lin.bias, bits, False, layout="plain")
    assert fast.layout == "cpu" and slow.layout == "plain"
    assert torch.equal(fast.codes(), slow.codes())
    assert int(codes.max()) < 2 ** bits
    x = torch.randn(3, 7, 192)
    torch.testing.assert_close(fast(x), slow(x), rtol=2e-2, atol=2e-2)
    assert fast(x).shape == (3, 7, 64)


def test_int4_fallback_for_shapes_the_kernel_refuses():
    lin = _linear(24, 96)  # N % 16 != 0 on the CPU kernel; group 48 is not a kernel group
    for g in (32, 48):
        mod = Int4WeightOnlyLinear.from_float(lin, g)
        assert mod.layout == "plain"
        x = torch.randn(2, 96)
        ref = x @ mod.dequantized_weight().t()
        assert ((mod(x) - ref).norm() / ref.norm()) < 1e-2
    with use_kernels(False):
        assert Int4WeightOnlyLinear.from_float(_linear(64, 128), 64).layout == "plain"


@pytest.mark.parametrize("k", [576, 32, 24])  # 24: the CPU kernel needs K % 16 == 0 -> fallback
def test_int8_weight_only_kernel_and_fallback(k):
    lin = _linear(48, k, bias=True)
    mod = Int8WeightOnlyLinear.from_float(lin)
    assert mod.storage_bytes() == 48 * k + 48 * 4 + 48 * 4
    x = torch.randn(4, k)
    y = mod(x)
    with use_kernels(False):
        y_fallback = mod(x)
    ref = x @ mod.dequantized_weight().t() + lin.bias
    assert ((y - ref).norm() / ref.norm()) < 1e-2
    assert ((y_fallback - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (17, 64, 40), (3, 20, 7)])
def test_int_mm_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    want = a.long() @ b.long().t()
    assert torch.equal(int_mm(a, b.t()).long(), want)
    with use_kernels(False):
        assert torch.equal(int_mm(a, b.t()).long(), want)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_dynamic_matches_fake_quant_reference(granularity):
    lin = _linear(40, 64, bias=True)
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


# ----------------------------------------------------------------------------- whole models
CONFIGS = [Int8WeightOnly(), Int8Dynamic(), Int4WeightOnly(group_size=32),
           Int4WeightOnly(group_size=32, symmetric=True), Int4WeightOnly(group_size=32, bits=3)]


def _tiny():
    return tiny_llama(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c))
def test_quantize_model_save_and_reload(config, tmp_path):
    model = _tiny()
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


def test_embedding_bits_none_keeps_embedding_and_head_in_float(tmp_path):
    model = _tiny()
    summary = quantize_(model, Int4WeightOnly(group_size=32, embedding_bits=None))
    assert set(summary.float_modules) == {"model.embed_tokens", "lm_head"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 8))
    save_quantized(model, tmp_path / "m")
    again = load_quantized(tmp_path / "m", device="cpu")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_filter_fn_and_float_report():
    model = _tiny()
    summary = quantize_(model, Int8Dynamic(), filter_fn=lambda m, name: "down_proj" not in name)
    assert all("down_proj" in k for k in summary.float_modules)
    assert len(summary.float_modules) == 2
    assert "float" in repr(summary)
    report = compression_report(model, on_disk=False)
    assert set(report["float_modules"]) == set(summary.float_modules)


def test_float_model_save_load_and_sizes(tmp_path):
    model = _tiny()
    path = save_quantized(model, tmp_path / "f")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(path.stat().st_size - 4 * n_params) < 20_000  # fp32 tensors + a small header
    again = load_quantized(tmp_path / "f", device="cpu")
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_config_round_trip():
    for c in CONFIGS:
        assert config_from_dict(config_to_dict(c)) == c
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"type": "Int2Magic"})


def test_quantized_modules_report_storage():
    model = _tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedModule)
    # codes in·out/2 bytes + (K/g)·N·2 bf16 scale/zero pairs
    assert q_proj.storage_bytes() == 64 * 64 // 2 + (64 // 32) * 64 * 2 * 2


def test_generate_runs_on_quantized_model():
    model = _tiny()
    quantize_(model, Int8Dynamic())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


# ----------------------------------------------------------------------------- smoothquant, awq, gptq
def _calibration(n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, t), generator=g) for _ in range(n)]


def test_activation_stats_and_outlier_table():
    from distill_lab.smoothquant import collect_activation_stats, outlier_table

    model = _tiny()
    stats = collect_activation_stats(model, _calibration(), sample_tokens=32, progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert stats.absmax[name].shape == (128,) and stats.samples[name].shape == (32, 128)
    assert stats.tokens == 4 * 2 * 16
    rows = outlier_table(stats)
    assert len(rows) == 15 and all(r["max_abs"] >= r["mean_abs"] for r in rows)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_smoothquant_preserves_the_float_function(alpha):
    from distill_lab.smoothquant import collect_activation_stats, smooth_

    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    stats = collect_activation_stats(model, _calibration(), progress=False)
    scales = smooth_(model, stats, alpha)
    assert len(scales) == 2 * 4
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        smooth_(model, stats, 1.5)


def test_smoothquant_helps_w8a8_with_an_outlier_channel():
    from distill_lab.smoothquant import collect_activation_stats, smooth_

    torch.manual_seed(0)
    model = _tiny()
    with torch.no_grad():  # plant an outlier channel in every block's MLP input and down_proj input
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[5] = 60.0
            layer.mlp.up_proj.weight[7] *= 80.0
    ids = torch.randint(0, 256, (4, 16))
    ref = model(ids).logits
    plain = copy.deepcopy(model)
    quantize_(plain, Int8Dynamic(embedding_bits=None))
    smoothed = copy.deepcopy(model)
    smooth_(smoothed, collect_activation_stats(smoothed, _calibration(), progress=False), 0.5)
    quantize_(smoothed, Int8Dynamic(embedding_bits=None))
    err_plain = (plain(ids).logits - ref).norm()
    err_smooth = (smoothed(ids).logits - ref).norm()
    assert err_smooth < err_plain


def test_awq_preserves_function_and_does_not_hurt_calibration_error():
    from distill_lab.smoothquant import awq_, collect_activation_stats

    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    stats = collect_activation_stats(model, _calibration(), sample_tokens=64, progress=False)
    scaled = copy.deepcopy(model)
    chosen = awq_(scaled, stats, group_size=32, grid=5, clip=False, progress=False)  # scaling alone preserves the function
    assert len(chosen) == 8 and all(0 <= a <= 1 for a in chosen.values())
    torch.testing.assert_close(scaled(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_gptq_hessians_are_shared_only_by_linears_that_read_the_same_tensor():
    """A freed input's address reused by the next Linear's new input must not alias their Hessians."""
    from distill_lab.gptq import collect_hessians

    class TwoStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, ids):
            y = self.a(self.emb(ids) * 2.0)  # the temporary input of `a` is freed after the call
            return self.b(torch.tanh(y))     # a new (B, T, 16) input, often at the freed address

    torch.manual_seed(0)
    net, batches = TwoStage().eval(), [torch.randint(0, 50, (4, 64)) for _ in range(3)]
    hessians = collect_hessians(net, batches, progress=False)
    with torch.no_grad():
        x_a = torch.cat([net.emb(i) * 2.0 for i in batches]).reshape(-1, 16).double()  # (N, 16)
        x_b = torch.tanh(net.a(x_a.float())).double()                                   # (N, 16)
    assert hessians["a"] is not hessians["b"]
    torch.testing.assert_close(hessians["a"], x_a.t() @ x_a / len(x_a))
    torch.testing.assert_close(hessians["b"], x_b.t() @ x_b / len(x_b))

    llama = tiny_llama().eval()
    h = collect_hessians(llama, [torch.randint(0, 256, (2, 16)) for _ in range(2)], progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        assert h[p + "self_attn.q_proj"] is h[p + "self_attn.k_proj"] is h[p + "self_attn.v_proj"]
        assert h[p + "mlp.gate_proj"] is h[p + "mlp.up_proj"]
        assert h[p + "self_attn.o_proj"] is not h[p + "mlp.gate_proj"]


def test_gptq_beats_rtn_on_its_objective():
    from distill_lab.gptq import gptq_quantize_weight

    torch.manual_seed(0)
    k = 128
    x = torch.randn(512, k) @ torch.randn(k, k) * 0.3  # correlated inputs
    w = torch.randn(32, k)
    h = (x.double().t() @ x.double()) / len(x)
    q = gptq_quantize_weight(w, h, bits=4, group_size=32, symmetric=False)
    rtn = fake_quantize(w, 4, 32, False)
    err_gptq = (x @ dequantize(q).t() - x @ w.t()).pow(2).sum()
    err_rtn = (x @ rtn.t() - x @ w.t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15


def test_gptq_model_runs_and_saves(tmp_path):
    from distill_lab.gptq import gptq_

    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    gptq_(model, _calibration(), Int4WeightOnly(group_size=32), progress=False)
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.25
    save_quantized(model, tmp_path / "g")
    torch.testing.assert_close(load_quantized(tmp_path / "g", device="cpu")(ids).logits, out)


# ----------------------------------------------------------------------------- QAT
@pytest.mark.parametrize("config", [Int4WeightOnly(group_size=32), Int4WeightOnly(group_size=32, bits=3),
                                    Int8Dynamic(), Int8WeightOnly()], ids=repr)
def test_qat_forward_matches_converted_model(config):
    from distill_lab.qat import QATLinear, convert_, prepare_qat_

    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    prepare_qat_(model, config)
    assert sum(isinstance(m, QATLinear) for m in model.modules()) == 14
    fake = model(ids).logits
    convert_(model)
    assert not any(isinstance(m, (QATLinear, nn.Linear)) for m in model.modules())
    real = model(ids).logits
    direct = copy.deepcopy(_tiny())
    quantize_(direct, config)
    torch.testing.assert_close(real, direct(ids).logits, rtol=1e-5, atol=1e-5)  # same modules, same rounding
    assert ((real - fake).norm() / fake.norm()) < 3e-2  # fake quant = real kernels up to bf16


def test_fake_quantize_straight_through_gradient():
    from distill_lab.qat import FakeQuantize

    w = torch.randn(4, 32, requires_grad=True)
    fq = FakeQuantize(4, 16, False)
    out = fq(w)
    torch.testing.assert_close(out, fake_quantize(w.detach(), 4, 16, False))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_training_reduces_kd_loss():
    from distill_lab.qat import convert_, kd_loss, prepare_qat_, train_qat

    teacher = _tiny()
    with torch.no_grad():  # peaked logits, so there is something to distil
        teacher.model.embed_tokens.weight.mul_(8)
    student = copy.deepcopy(teacher)
    prepare_qat_(student, Int4WeightOnly(group_size=32, bits=2))
    windows = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = kd_loss(student(windows).logits, teacher(windows).logits).item()
    history = train_qat(student, teacher, windows, steps=30, batch_size=8, lr=1e-3, bf16=False,
                        progress=False)
    with torch.no_grad():
        after = kd_loss(student(windows).logits, teacher(windows).logits).item()
    assert len(history) == 30 and after < 0.7 * before
    assert all(p.requires_grad for p in student.parameters())  # frozen ones restored
    convert_(student)
    assert isinstance(student.model.layers[0].mlp.up_proj, Int4WeightOnlyLinear)


def test_kd_loss_is_zero_for_identical_logits_and_matches_formula():
    from distill_lab.qat import kd_loss

    a = torch.randn(2, 3, 11)
    assert kd_loss(a, a).item() == pytest.approx(0, abs=1e-6)
    b = torch.randn(2, 3, 11)
    p = torch.softmax(b.double() / 2, -1)
    want = (p * (p.log() - torch.log_softmax(a.double() / 2, -1))).sum(-1).mean() * 4
    assert kd_loss(a, b, 2.0).item() == pytest.approx(want.item(), rel=1e-5)


# ----------------------------------------------------------------------------- CUDA (skipped without it)
@cuda
@pytest.mark.gpu
def test_cuda_int4_and_int8_match_cpu_reference():
    lin = _linear(1536, 576)
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


@cuda
@pytest.mark.gpu
def test_cuda_int_mm_small_m_is_padded():
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device="cuda")
    assert torch.equal(int_mm(a, b.t()).long().cpu(), (a.long() @ b.long().t()).cpu())


# ----------------------------------------------------------------------------- knobs panel, plots
def test_quantization_view_and_widget():
    import matplotlib.pyplot as plt

    from distill_lab.plotting import plot_quantization_view
    from distill_lab.quantize import quantization_view
    from distill_lab.widgets import quantization_widget

    torch.manual_seed(0)
    w = torch.randn(32, 192)
    view = quantization_view(w, 4, 64, True)
    assert len(view["grid"]) == 15 and view["group_values"].numel() == 64
    assert view["sqnr_db"] == pytest.approx(sqnr_db(w, fake_quantize(w, 4, 64, True)))
    assert quantization_view(w, 8, "per-tensor", False)["group_values"].numel() == w.numel()
    plt.close(plot_quantization_view(view))
    panel = quantization_widget(w)
    bits, granularity, symmetric = panel.children[:3]
    assert 128 not in [value for _, value in granularity.options]  # 192 is not divisible by 128
    assert ("group of 64", 64) in granularity.options  # the option says what the number is
    bits.value, granularity.value, symmetric.value = 8, "per-channel", False
    assert panel.result["bits"] == 8 and panel.result["granularity"] == "per-channel"
    assert panel.result["sqnr_db"] > view["sqnr_db"] + 15
    plt.close("all")


def test_outlier_and_loss_plots():
    import matplotlib.pyplot as plt

    from distill_lab.plotting import plot_activation_outliers, plot_channel_ranges, plot_loss_histories

    rows = [{"layer": f"model.layers.{i}.mlp.down_proj", "max_abs": 10.0 * (i + 1), "mean_abs": 0.1} for i in range(3)]
    for fig in (plot_activation_outliers(rows), plot_channel_ranges({"a": torch.rand(8)}),
                plot_loss_histories({"int4": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})):
        assert fig.axes
        plt.close(fig)


def test_int8_dynamic_head_option():
    model = _tiny()
    quantize_(model, Int8Dynamic(head="w8a8"))
    assert isinstance(model.lm_head, Int8DynamicLinear)
    model = _tiny()
    quantize_(model, Int8Dynamic())
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="head"):
        Int8Dynamic(head="fp8")


def test_int8_weight_only_many_rows_uses_bf16_gemm_and_matches():
    lin = _linear(64, 96)
    mod = Int8WeightOnlyLinear.from_float(lin)
    x = torch.randn(100, 96)  # more rows than the int8 kernel serves well
    ref = x @ mod.dequantized_weight().t()
    assert ((mod(x) - ref).norm() / ref.norm()) < 1e-2


def test_clip_search_never_hurts_the_weighted_error():
    from distill_lab.quantize import clip_weight_, search_clip_ratios

    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[0, 5] = 9.0  # one outlier stretches its group's grid
    imp = torch.rand(128)
    for sym in (False, True):
        r = search_clip_ratios(w, 4, 64, sym, imp)
        assert r.shape == (16, 2) and (r <= 1).all() and r[0, 0] <= 1
        clipped = w.clone()
        clip_weight_(clipped, 4, 64, sym, imp)
        err = lambda q: ((q - w) ** 2 * imp).sum()  # noqa: E731
        assert err(fake_quantize(clipped, 4, 64, sym)) <= err(fake_quantize(w, 4, 64, sym)) + 1e-6


def test_qat_default_loss_is_the_course_distillation_loss():
    from distill_lab.distill import DistillationLoss
    from distill_lab.qat import kd_loss

    s, t = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    assert DistillationLoss(temperature=1.0, alpha=1.0)(s, t).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-5)


def test_saved_model_is_readable_by_others(tmp_path):
    """Atomic writes go through mkdtemp (0700); the published folder gets the umask's usual modes."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        model = _tiny()
        quantize_(model, Int8WeightOnly())
        path = save_quantized(model, tmp_path / "shared")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in path.parent.iterdir())


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_int8_dynamic_cpu_chunks_are_bit_identical_to_the_plain_path(granularity, m, monkeypatch):
    """Issue 18: the in-place, row-chunked W8A8 epilogue returns exactly what quantize -> int_mm -> scale gave."""
    import distill_lab.quantize as Q

    monkeypatch.setattr(Q, "W8A8_CHUNK_ELEMENTS", 3 * 48)  # 3 rows per chunk: several chunks and a ragged end
    lin = _linear(48, 64, bias=True)
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
