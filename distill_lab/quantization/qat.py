"""Quantization-aware training: train through the rounding with a straight-through estimator.

* Fake quantization with the straight-through estimator (STE): the forward pass uses the
  quantized weight, the backward pass treats rounding as the identity (Bengio et al., 2013,
  arXiv:1308.3432; Jacob et al., 2018, arXiv:1712.05877).
* QAT for LLMs with a distillation loss from the full-precision model (LLM-QAT, Liu et al., 2023,
  arXiv:2305.17888), here a token-level KL to the fp32 teacher's logits (Hinton et al., 2015).
* The API follows torchao's: ``prepare_qat_(model, config)`` swaps Linears for ``QATLinear``
  (float weights, fake-quantized in the forward pass), and ``convert_(model)`` turns them into
  the same real int8/int4 modules ``quantize_`` builds, with the same rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import check_linear_layout, swap_guard
from ..distillation import KD_TEMPERATURE, DistillationLoss, DistillationTrainer, TrainConfig
from .api import KeptInFloat, QuantizationSummary, Reason, quantize_embedding_and_head_
from .api import linear_from_config as _linear_from_config
from .configs import CONFIGS, config_to_dict
from .configs import Int4WeightOnlyConfig as Int4WeightOnly
from .configs import Int8DynamicConfig as Int8Dynamic
from .configs import Int8WeightOnlyConfig as Int8WeightOnly
from .modules import set_module as _set_module
from .primitives import fake_quantize


class FakeQuantize(nn.Module):
    """Quantize-dequantize in the forward pass, identity in the backward pass (STE)."""

    def __init__(self, bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                 axis: int | None = -1, dynamic_per_token: bool = False):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.axis = bits, group_size, symmetric, axis
        self.dynamic_per_token = dynamic_per_token  # activations: one absmax scale per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_per_token:
            scale = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / (2 ** (self.bits - 1) - 1)
            q = torch.round(x.detach() / scale) * scale
        else:
            q = fake_quantize(x.detach(), self.bits, self.group_size, self.symmetric, self.axis).to(x.dtype)
        return x + (q - x).detach()  # value of q, gradient of x

    def extra_repr(self) -> str:
        if self.dynamic_per_token:
            return f"int{self.bits} per-token dynamic"
        return f"int{self.bits} group={self.group_size} {'sym' if self.symmetric else 'asym'}"


def weight_fake_quantizer(config) -> FakeQuantize:
    """The weight fake-quantizer that reproduces ``config``'s rounding."""
    if isinstance(config, Int4WeightOnly):
        return FakeQuantize(config.bits, config.group_size, config.symmetric, -1)
    if isinstance(config, Int8Dynamic):
        axis = -1 if config.weight_granularity == "per_channel" else None
        return FakeQuantize(8, None, True, axis)
    if isinstance(config, Int8WeightOnly):
        return FakeQuantize(8, None, True, -1)
    raise ValueError(f"config={config!r}; allowed: an instance of {', '.join(CONFIGS)}")


class QATLinear(nn.Module):
    """A Linear that keeps float weights (trained) and computes with their fake-quantized version."""

    def __init__(self, linear: nn.Linear, config):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: training updates it
        self.bias = linear.bias
        self.config = config
        self.weight_fake_quant = weight_fake_quantizer(config)
        self.act_fake_quant = None
        if isinstance(config, Int8Dynamic):
            if config.act_granularity == "per_token":
                self.act_fake_quant = FakeQuantize(8, dynamic_per_token=True)
            else:
                self.act_fake_quant = FakeQuantize(8, None, True, axis=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fake_quant is not None:
            x = self.act_fake_quant(x)
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def prepare_qat_(model: nn.Module, config, filter_fn=None) -> nn.Module:
    """Swap every Linear (but the output head) for a ``QATLinear`` in place; returns the model.

    The embedding and the head stay in float during training and follow
    ``config.embedding_bits`` at ``convert_``.
    """
    if not isinstance(config, tuple(CONFIGS.values())):
        raise ValueError(f"config={config!r}; allowed: an instance of {', '.join(CONFIGS)}")
    check_linear_layout(model, "prepare_qat_")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with swap_guard(model, "prepare_qat_"):  # the model must still run afterwards, else it is put back
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or module is head:
                continue
            if filter_fn is not None and not filter_fn(module, name):
                continue
            if isinstance(config, Int4WeightOnly) and module.in_features % config.group_size:
                continue
            _set_module(model, name, QATLinear(module, config))
        model.qat_config = config
    return model


def convert_(model: nn.Module) -> QuantizationSummary:
    """Replace every ``QATLinear`` with the real quantized module (same rounding), then the embedding/head."""
    config = getattr(model, "qat_config", None)
    if config is None:
        raise ValueError("convert_ needs a model prepared with prepare_qat_(model, config)")
    summary = QuantizationSummary(config=config_to_dict(config))
    with swap_guard(model, "convert_"):  # the model must still run afterwards, else it is put back
        for name, module in list(model.named_modules()):
            if isinstance(module, QATLinear):
                with torch.no_grad():
                    qmod = _linear_from_config(module, config)  # duck-typed: .weight, .bias, .in_features
                _set_module(model, name, qmod)
                summary.count(qmod.kind)
        head_name = quantize_embedding_and_head_(model, config, summary)
        for name, module in model.named_modules():  # Linears prepare_qat_ left alone stay in float: say so
            if isinstance(module, nn.Linear) and name != head_name:
                why = Reason.GROUP_SIZE if module.in_features % getattr(config, "group_size", 1) else Reason.FILTER_FN
                summary.float_modules[name] = KeptInFloat(why, "not prepared for QAT (filter_fn or in_features not "
                                                               "divisible by group_size)")
        model.quantization_config = config_to_dict(config)
        del model.qat_config
    return summary


def qat_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters QAT trains: the fake-quantized Linear weights (and their biases)."""
    params = []
    for m in model.modules():
        if isinstance(m, QATLinear):
            params.append(m.weight)
            if m.bias is not None:
                params.append(m.bias)
    return params


def train_qat(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, steps: int = 30,
              batch_size: int = 4, lr: float = 2e-5, kd_temperature: float = KD_TEMPERATURE, loss_fn=None,
              bf16: bool | str = "auto", seed: int = 0, progress: bool = True) -> list[dict]:
    """Distil the fp32 ``teacher`` into the fake-quantized ``model`` for ``steps`` AdamW steps; returns the loss history.

    ``windows`` (N, T) are training token windows, drawn at random with replacement (seeded). Only
    the QAT Linear weights train. The loop is ``distillation.DistillationTrainer``: the teacher runs
    live once per step under ``no_grad`` (bf16 autocast when ``bf16``); the student runs with bf16
    autocast too, with fp32 master weights. ``bf16='auto'`` turns it on only where it is measured
    faster here (``distill_lab.hardware``). ``loss_fn(student_logits, teacher_logits)`` defaults to
    ``distillation.DistillationLoss(kd_temperature, alpha=1)`` on every position (pure forward KL, chunked
    so the 49k vocabulary fits; its unchunked form is ``distillation.soft_target_loss``). A cosine schedule decays the learning rate
    to 10 %. Each history row is ``{"step", "loss", "lr"}`` with the learning rate after that step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}; allowed: both >= 1")
    if loss_fn is None:
        loss_fn = DistillationLoss(kd_temperature, alpha=1.0)
    params = qat_parameters(model)
    if not params:
        raise ValueError("no QATLinear in the model: call prepare_qat_(model, config) first")
    # the former loop's settings, kept so that its numbers do not move: AdamW's defaults without decay
    # (unfused), cosine from the first step to 10 %, windows drawn with replacement, the caller's RNG
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, betas=(0.9, 0.999),
                         warmup_steps=0, min_lr_ratio=0.1, schedule="cosine", sampling="random",
                         fused=False, reseed=False, bf16=bf16, teacher_bf16=bf16, seed=seed,
                         progress=progress)
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history = []

    def record(trainer, step, row):
        history.append({"step": step, "loss": row["loss"], "lr": trainer.scheduler.get_last_lr()[0]})

    try:
        DistillationTrainer(model, windows, teacher=teacher, loss=loss_fn, config=config, every_position=True,
                            freeze_teacher=False, callbacks=[record], desc="QAT").train()
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
    return history


__all__ = ["FakeQuantize", "QATLinear", "prepare_qat_", "convert_", "train_qat",
           "qat_parameters", "weight_fake_quantizer"]
