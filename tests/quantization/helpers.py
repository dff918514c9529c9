"""Small models and layers the quantization tests share."""

import pytest
import torch
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.quantization.configs import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def linear(n, k, seed=0, bias=False):
    """An (n, k) Linear whose rows have different magnitudes."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, 1) * 4)  # rows of different magnitude
    return lin


def tiny():
    """A tiny Llama (width 64, MLP 128, 4 heads, 2 KV heads): every int4 group size up to 64 fits."""
    return tiny_llama(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)


def calibration(n=4, t=16, seed=0):
    """``n`` calibration batches of (2, t) token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, t), generator=g) for _ in range(n)]


# one config of each kind and the int4 variants: what save/load and the round trips run over
SAMPLE_CONFIGS = [Int8WeightOnlyConfig(), Int8DynamicConfig(), Int4WeightOnlyConfig(group_size=32),
                  Int4WeightOnlyConfig(group_size=32, symmetric=True), Int4WeightOnlyConfig(group_size=32, bits=3)]
