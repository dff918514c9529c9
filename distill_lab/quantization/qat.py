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
from ..summary import Summary
from .api import KeptInFloat, QuantizationSummary, Reason, linear_from_config, misfit, quantize_embedding_and_head_
from .configs import Int4WeightOnlyConfig, Int8WeightOnlyConfig, config_to_dict
from .embeddings import INT4_EMBEDDING_GROUP
from .modules import embedding_and_head, module_name, set_module
from .primitives import FakeQuantize
from .registry import format_for


def weight_fake_quantizer(config) -> FakeQuantize:
    """The weight fake-quantizer that reproduces ``config``'s rounding (its registered format's)."""
    return format_for(config).weight_fake_quant(config)


def embedding_fake_quantizer(bits: int) -> FakeQuantize:
    """The fake-quantizer of an embedding table (and its tied head) stored with ``embedding_bits=bits``:
    int4, asymmetric groups of ``INT4_EMBEDDING_GROUP`` along the hidden dim (``Int4Embedding``'s grid);
    int8, one symmetric scale per row (``Int8Embedding``'s)."""
    if bits == 4:
        return weight_fake_quantizer(Int4WeightOnlyConfig(group_size=INT4_EMBEDDING_GROUP))
    if bits == 8:
        return weight_fake_quantizer(Int8WeightOnlyConfig())
    raise ValueError(f"bits={bits!r}; allowed: 4 or 8")


class QATEmbedding(nn.Module):
    """An embedding that keeps its float table (trained) and looks rows up in its fake-quantized version."""

    def __init__(self, embedding: nn.Embedding, fake_quant: FakeQuantize):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight  # the same Parameter (also the tied head's)
        self.weight_fake_quant = fake_quant

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_fake_quant(self.weight), self.padding_idx)

    def to_float(self) -> nn.Embedding:
        """The plain ``nn.Embedding`` over the same Parameter (``convert_`` quantizes it for real)."""
        emb = torch.nn.utils.skip_init(nn.Embedding, self.num_embeddings, self.embedding_dim,
                                       padding_idx=self.padding_idx)
        emb.weight = self.weight
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class QATLinear(nn.Module):
    """A Linear that keeps float weights (trained) and computes with their fake-quantized version."""

    def __init__(self, linear: nn.Linear, config, weight_fake_quant: FakeQuantize | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: training updates it
        self.bias = linear.bias
        self.config = config
        self.is_head = weight_fake_quant is not None  # a tied head on its embedding's grid (convert_ restores it)
        self.weight_fake_quant = weight_fake_quant or weight_fake_quantizer(config)
        self.act_fake_quant = None if self.is_head else format_for(config).act_fake_quant(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fake_quant is not None:
            x = self.act_fake_quant(x)
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` over the same Parameters."""
        lin = torch.nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin


def prepare_qat_(model: nn.Module, config, filter_fn=None, embedding: bool = False) -> Summary:
    """Swap every Linear (but the output head) for a ``QATLinear`` in place.

    With ``embedding`` and ``config.embedding_bits`` (4 or 8), a plain embedding and its tied head are
    fake-quantized on the grid ``convert_`` will store them on (``QATEmbedding``, and the head's
    ``QATLinear`` sharing its fake-quantizer), so training sees the quantized table too; else they stay
    in float during training and follow ``config.embedding_bits`` at ``convert_``. Returns a ``Summary``: {swapped Linear: "QATLinear"},
    and the Linears left in float with their reason.
    """
    spec = format_for(config)  # a registered format, else ValueError naming the registered ones
    check_linear_layout(model, "prepare_qat_")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    summary = Summary("prepare_qat_", config_to_dict(config), unit="module")
    with swap_guard(model, "prepare_qat_"):  # the model must still run afterwards, else it is put back
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or module is head:
                continue
            if filter_fn is not None and not filter_fn(module, name):
                summary.kept[name] = KeptInFloat(Reason.FILTER_FN, "filter_fn")
                continue
            if not spec.fits(module.in_features, config):
                summary.kept[name] = misfit(module.in_features, config)
                continue
            set_module(model, name, QATLinear(module, config))
            summary.changed[name] = "QATLinear"
        if embedding:
            _prepare_embedding(model, config, summary)
        model.qat_config = config
    return summary


def _prepare_embedding(model: nn.Module, config, summary: Summary) -> None:
    """Fake-quantize a plain embedding (and its tied head, on the same grid) as ``config.embedding_bits`` stores it.

    The tied head is the largest matmul of the model and reads the same table: training through its
    rounding lets the model adapt to the int4 embedding that ``convert_`` builds (left in float
    otherwise; an untied head, another embedding type or a width the group does not divide stay float
    during training and are quantized at ``convert_`` as before).
    """
    bits = getattr(config, "embedding_bits", None)
    emb, head = embedding_and_head(model)
    if bits is None or type(emb) is not nn.Embedding:
        return
    if bits == 4 and emb.embedding_dim % INT4_EMBEDDING_GROUP:
        return
    tied = type(head) is nn.Linear and head.weight is emb.weight
    if head is not None and not tied:
        return  # an untied head has its own grid (quantize_embedding_and_head_): not trained through here
    fq = embedding_fake_quantizer(bits)
    emb_name, head_name = module_name(model, emb), module_name(model, head)
    set_module(model, emb_name, QATEmbedding(emb, fq))
    summary.changed[emb_name] = "QATEmbedding"
    if tied:
        set_module(model, head_name, QATLinear(head, config, weight_fake_quant=fq))
        summary.changed[head_name] = "QATLinear (tied head, the embedding's grid)"


def convert_(model: nn.Module) -> QuantizationSummary:
    """Replace every ``QATLinear`` with the real quantized module (same rounding), then the embedding/head."""
    config = getattr(model, "qat_config", None)
    if config is None:
        raise ValueError("convert_ needs a model prepared with prepare_qat_(model, config)")
    summary = QuantizationSummary(technique="convert_", config=config_to_dict(config))
    with swap_guard(model, "convert_"):  # the model must still run afterwards, else it is put back
        for name, module in list(model.named_modules()):  # the embedding and tied head: float again, then real below
            if isinstance(module, QATEmbedding) or (isinstance(module, QATLinear) and module.is_head):
                set_module(model, name, module.to_float())
        for name, module in list(model.named_modules()):
            if isinstance(module, QATLinear):
                with torch.no_grad():
                    qmod = linear_from_config(module, config)  # duck-typed: .weight, .bias, .in_features
                set_module(model, name, qmod)
                summary.add(name, qmod.kind)
        head_name = module_name(model, embedding_and_head(model)[1])
        quantize_embedding_and_head_(model, config, summary)
        spec = format_for(config)
        for name, module in model.named_modules():  # Linears prepare_qat_ left alone stay in float: say so
            if isinstance(module, nn.Linear) and name != head_name:
                fits = spec.fits(module.in_features, config)
                summary.float_modules[name] = KeptInFloat(Reason.FILTER_FN, "not prepared for QAT (filter_fn)") \
                    if fits else misfit(module.in_features, config)
        model.quantization_config = config_to_dict(config)
        del model.qat_config
    return summary


def qat_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters QAT trains: the fake-quantized Linear and embedding weights (and biases), each once."""
    params, seen = [], set()
    for m in model.modules():
        if isinstance(m, (QATLinear, QATEmbedding)):
            for p in (m.weight, getattr(m, "bias", None)):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
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


__all__ = ["QATEmbedding", "QATLinear", "prepare_qat_", "convert_", "train_qat",
           "embedding_fake_quantizer", "qat_parameters", "weight_fake_quantizer"]
