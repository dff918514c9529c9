"""Tests for distill_lab.quantization.primitives: codes and scales against loop references, errors, clipping."""

import math

import pytest
import torch

from distill_lab.quantization.primitives import (Granularity, QuantizedTensor, clip_weight_, dequantize,
                                                 fake_quantize, quantization_error, quantize_tensor,
                                                 search_clip_ratios, sqnr_db)


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


def test_value_errors_for_bad_tensors():  # the config and quantize_ parts: test_configs, test_api
    with pytest.raises(ValueError, match="empty"):
        quantize_tensor(torch.empty(0, 8))
    with pytest.raises(ValueError, match="floating"):
        quantize_tensor(torch.ones(4, 8, dtype=torch.int32))


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


def test_clip_search_never_hurts_the_weighted_error():
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


# ----------------------------------------------------------------------------- Granularity
def test_granularity_is_one_string_enum_that_reads_old_spellings():
    assert Granularity.PER_CHANNEL == "per_channel" and isinstance(Granularity.PER_TENSOR, str)
    assert [g.value for g in Granularity] == ["per_tensor", "per_channel", "per_group", "per_token"]
    for spelling in ("per_channel", "per-channel", "Per-Channel", Granularity.PER_CHANNEL):
        assert Granularity(spelling) is Granularity.PER_CHANNEL
    assert Granularity("per-tensor") is Granularity.PER_TENSOR
    assert f"{Granularity.PER_GROUP}" == str(Granularity.PER_GROUP) == "per_group"  # prints as its value
    assert Granularity.PER_TENSOR.axis is None and Granularity.PER_CHANNEL.axis == -1


def test_granularity_parse_names_the_bad_value_and_the_allowed_ones():
    allowed = (Granularity.PER_CHANNEL, Granularity.PER_TENSOR)
    assert Granularity.parse("per-tensor", "x", allowed) is Granularity.PER_TENSOR
    with pytest.raises(ValueError, match=r"weight_granularity='per_row'; allowed: 'per_channel', 'per_tensor'"):
        Granularity.parse("per_row", "weight_granularity", allowed)
    with pytest.raises(ValueError, match=r"g='per_group'; allowed: 'per_channel', 'per_tensor'"):
        Granularity.parse("per_group", "g", allowed)
    with pytest.raises(ValueError, match="allowed: 'per_tensor', 'per_channel', 'per_group', 'per_token'"):
        Granularity.parse(3)


def test_quantized_tensor_reports_its_grid_and_bytes():
    q = quantize_tensor(torch.randn(4, 32), 4, 8, symmetric=False)
    assert isinstance(q, QuantizedTensor) and (q.qmin, q.qmax) == (0, 15)
    assert q.nbytes() == 4 * 32 // 2 + 4 * 4 * 4 * 2 and q.nbytes(packed=False) == 4 * 32 + 4 * 4 * 4 * 2
    torch.testing.assert_close(q.dequantize(), dequantize(q))
