"""Tests for distill_lab.quantization.gptq: shared Hessians, GPTQ against RTN, and gptq_ on a model."""

import pytest
import torch
from torch import nn

from distill_lab.models import tiny_llama
from distill_lab.quantization.configs import Int4WeightOnlyConfig, Int8DynamicConfig
from distill_lab.calibration import collect_hessians
from distill_lab.quantization.gptq import gptq_, gptq_quantize_weight
from distill_lab.quantization.modules import Int4WeightOnlyLinear
from distill_lab.quantization.primitives import dequantize, fake_quantize
from distill_lab.quantization.serialization import load_quantized, save_quantized

from .helpers import calibration, tiny


def test_gptq_hessians_are_shared_only_by_linears_that_read_the_same_tensor():
    """A freed input's address reused by the next Linear's new input must not alias their Hessians."""
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
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids).logits
    gptq_(model, Int4WeightOnlyConfig(group_size=32), calibration=calibration(), progress=False)
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.25
    save_quantized(model, tmp_path / "g")
    torch.testing.assert_close(load_quantized(tmp_path / "g", device="cpu")(ids).logits, out)


def test_gptq_takes_the_config_first_and_keeps_its_bits():
    model = tiny()
    config = Int4WeightOnlyConfig(group_size=32, bits=3, symmetric=True)
    summary = gptq_(model, config, calibration=calibration(n=2), clip=False, progress=False)
    layers = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(layers) == 14 and {(m.bits, m.group_size, m.symmetric) for m in layers} == {(3, 32, True)}
    assert summary.config["type"] == "Int4WeightOnlyConfig" and summary.config["bits"] == 3
    with pytest.raises(TypeError):
        gptq_(tiny(), config, calibration(n=1))  # calibration is keyword-only
    with pytest.raises(ValueError, match="allowed: an Int4WeightOnlyConfig"):
        gptq_(tiny(), Int8DynamicConfig(), calibration=calibration(n=1))
