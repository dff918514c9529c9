"""Tests for distill_lab.quantization.kernels: packing, the integer matmuls, and their fallbacks."""

import pytest
import torch

from distill_lab.quantization.kernels import int_mm, kernels_enabled, use_kernels
from distill_lab.quantization.int4_kernels import int4_codes_and_scales, pack_int4, unpack_int4
from distill_lab.quantization.modules import Int4WeightOnlyLinear, Int8WeightOnlyLinear

from .helpers import cuda, linear


def test_pack_unpack_int4():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_equals_fallback(bits):
    lin = linear(64, 192, seed=bits, bias=True)
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
    lin = linear(24, 96)  # N % 16 != 0 on the CPU kernel; group 48 is not a kernel group
    for g in (32, 48):
        mod = Int4WeightOnlyLinear.from_float(lin, g)
        assert mod.layout == "plain"
        x = torch.randn(2, 96)
        ref = x @ mod.dequantized_weight().t()
        assert ((mod(x) - ref).norm() / ref.norm()) < 1e-2
    with use_kernels(False):
        assert Int4WeightOnlyLinear.from_float(linear(64, 128), 64).layout == "plain"


@pytest.mark.parametrize("k", [576, 32, 24])  # 24: the CPU kernel needs K % 16 == 0 -> fallback
def test_int8_weight_only_kernel_and_fallback(k):
    lin = linear(48, k, bias=True)
    mod = Int8WeightOnlyLinear.from_float(lin)
    assert mod.storage_bytes() == 48 * k + 48 * 4 + 48 * 4
    x = torch.randn(4, k)
    y = mod(x)
    with use_kernels(False):
        y_fallback = mod(x)
    ref = x @ mod.dequantized_weight().t() + lin.bias
    assert ((y - ref).norm() / ref.norm()) < 1e-2
    assert ((y_fallback - ref).norm() / ref.norm()) < 1e-2


def test_int8_weight_only_many_rows_uses_bf16_gemm_and_matches():
    lin = linear(64, 96)
    mod = Int8WeightOnlyLinear.from_float(lin)
    x = torch.randn(100, 96)  # more rows than the int8 kernel serves well
    ref = x @ mod.dequantized_weight().t()
    assert ((mod(x) - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (17, 64, 40), (3, 20, 7)])
def test_int_mm_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    want = a.long() @ b.long().t()
    assert torch.equal(int_mm(a, b.t()).long(), want)
    with use_kernels(False):
        assert torch.equal(int_mm(a, b.t()).long(), want)


@cuda
@pytest.mark.gpu
def test_cuda_int_mm_small_m_is_padded():
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device="cuda")
    assert torch.equal(int_mm(a, b.t()).long().cpu(), (a.long() @ b.long().t()).cpu())


def test_use_kernels_is_a_context_that_restores_the_switch():
    assert kernels_enabled()
    with use_kernels(False):
        assert not kernels_enabled()
        with use_kernels(True):
            assert kernels_enabled()
        assert not kernels_enabled()
    assert kernels_enabled()
