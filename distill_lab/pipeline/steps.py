"""The built-in step kinds: layer_drop, prune, distil, quantize, qat.

Each kind is a config dataclass (validated on construction), an ``apply`` function
``(model, config, StepContext) -> model`` and its registration with ``register_step``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..distillation import (KD_TEMPERATURE, DistillationLoss, DistillationTrainer, TeacherCache, TrainConfig,
                            cache_teacher_logits)
from ..models import make_student
from ..pruning.structured import StructuredConfig, prune_structured
from ..quantization.qat import convert_, prepare_qat_
from ..quantization import configs as q
from ..quantization.api import KeptInFloat, Reason, dequantize_, quantize_
from ..quantization.awq import awq_
from ..quantization.configs import QuantizationConfig, SmoothQuantConfig
from ..quantization.registry import config_type, format_for, format_names
from ..quantization.gptq import gptq_
from ..quantization.modules import QuantizedModule
from ..quantization.smoothquant import collect_activation_stats, smooth_
from .context import StepContext, _notice, model_digest
from .recipe import _config_from, register_step

__all__ = ["DistilStep", "LayerDropStep", "QATStep", "QAT_STARTS", "QUANT_ALGORITHMS", "QUANT_FORMATS", "QuantizeStep",
           "group_size_skips"]


# ----------------------------------------------------------------------------------------------
# Built-in steps: student init, structured prune, distil (heal), quantize (PTQ), QAT
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerDropStep:
    """Start a student from the teacher by keeping every ``keep_every``-th block (DistilBERT init)."""

    keep_every: int = 2  # keep blocks 0, k, 2k, ... (>= 1)
    layers: list | None = None  # explicit block indices instead of keep_every

    def __post_init__(self):
        if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1:
            raise ValueError(f"keep_every={self.keep_every!r}; allowed: an int >= 1")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
            raise ValueError(f"layers={self.layers!r}; allowed: null or a non-empty list of block indices")


def _validate_layer_drop(config: dict) -> None:
    _config_from(LayerDropStep, config, "step 'layer_drop'")


def _apply_layer_drop(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = _config_from(LayerDropStep, config, "step 'layer_drop'")
    return make_student(model, "layer_drop", keep_every=cfg.keep_every, layers=cfg.layers, seed=ctx.seed)


def _prune_config(config: dict):
    return _config_from(StructuredConfig, config, "step 'prune'")


def _apply_prune(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = _prune_config(config)
    calibration = ctx.calibration() if cfg.needs_calibration else None
    return prune_structured(model, cfg, calibration=calibration, progress=False)


# upper bounds of a distil/qat step's sizes: the gpu profile uses 300 steps of 16 windows; 10^5 steps is hours
# on a GPU and weeks on a laptop, a batch of 1024 windows of 512 tokens is 8 GiB of activations per layer
DISTIL_LIMITS = {"steps": 100_000, "batch_size": 1024, "top_k": 4096}


@dataclass
class DistilStep:
    """Distil the current model toward the teacher (healing after pruning), from cached top-k logits."""

    steps: int | None = None  # optimizer steps (null: profile.recipe_steps)
    batch_size: int | None = None  # windows per step (null: profile.recipe_batch)
    lr: float = 2e-4  # peak AdamW learning rate (warm-up, then cosine)
    kd_temperature: float = KD_TEMPERATURE  # softening temperature T of the divergence
    alpha: float = 1.0  # weight of the KD term (1 - alpha goes to cross-entropy on the labels)
    kind: str = "forward_kl"  # forward_kl, reverse_kl or jsd
    top_k: int | None = 64  # cached teacher logits per token (null: a live teacher, full vocabulary)
    bf16: bool | str = "auto"  # bf16 autocast for the student's forward (fp32 master weights); auto: if faster here

    def __post_init__(self):
        for name, most in DISTIL_LIMITS.items():
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most):
                raise ValueError(f"{name}={v!r}; allowed: null or an int from 1 to {most:,}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr!r}; allowed: a number in (0, 1]")
        self.loss()  # kd_temperature, alpha and kind are checked by the loss itself
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            raise ValueError(f"bf16={self.bf16!r}; allowed: true, false or auto (measured on this machine)")


    def loss(self) -> DistillationLoss:
        """The step's loss, built (and so validated) by ``DistillationLoss`` itself."""
        return DistillationLoss(self.kd_temperature, self.alpha, self.kind)


def _report_kept_in_float(ctx: StepContext, summary) -> None:
    """Record what stayed in float, as structured ``KeptInFloat`` dicts (JSON in the step record)."""
    ctx.report("kept_in_float", {name: why.to_dict() for name, why in summary.float_modules.items()})


def group_size_skips(extras: dict) -> dict:
    """The modules a step's ``extras`` say stayed in float because ``group_size`` does not divide their width:
    ``{name: detail}`` (the detail is the printed text)."""
    kept = {name: KeptInFloat.from_dict(v) for name, v in extras.get("kept_in_float", {}).items()}
    return {name: why.detail for name, why in kept.items() if why.reason is Reason.GROUP_SIZE}


def _validate_distil(config: dict) -> None:
    _config_from(DistilStep, config, "step 'distil'")


def _teacher_cache(ctx: StepContext, windows: torch.Tensor, k: int):
    """Top-k teacher logits for ``windows``, computed once and cached on disk next to the recipe."""

    folder = ctx.cache_dir or ctx.work_dir
    digest = hashlib.sha256(windows.numpy().tobytes() + (ctx.teacher_digest or model_digest(ctx.teacher)).encode())
    path = Path(folder) / f"teacher_top{k}_{digest.hexdigest()[:12]}.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        try:
            cache = TeacherCache.load(path)
            if cache.k != k or not torch.equal(cache.windows, windows):
                raise ValueError(f"holds k={cache.k} for other windows")
            return cache
        except Exception as err:  # SafetensorError (truncated), KeyError (a tensor missing), ValueError
            _notice(f"teacher logits cache {path} is damaged ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:120]}); removing it and computing it again")
            path.unlink(missing_ok=True)
    return cache_teacher_logits(ctx.teacher, windows, k=k, path=path, batch_size=ctx.profile.batch_size,
                                progress=ctx.progress)


def _distil_train(model: nn.Module, cfg: DistilStep, ctx: StepContext, before_train=None) -> dict:
    """Run the distillation trainer on ``model`` in place; return its history."""

    steps = cfg.steps or ctx.profile.recipe_steps
    batch = cfg.batch_size or ctx.profile.recipe_batch
    windows = ctx.train_windows()
    n = min(len(windows), steps * batch)  # one pass at most; fewer teacher forwards
    batch = min(batch, n)
    if cfg.top_k:
        # the teacher's logits are cached for at least the profile's distil budget of windows, so a shorter step
        # (e.g. 10 QAT steps after 30 distil steps) reads the first n windows of the same cache, not a new one
        pool = windows[:max(n, min(len(windows), ctx.profile.recipe_steps * ctx.profile.recipe_batch))]
        train = _teacher_cache(ctx, pool, cfg.top_k).head(n)
    else:
        train = windows[:n]
    loss = cfg.loss()
    tcfg = TrainConfig(steps=steps, batch_size=batch, lr=cfg.lr, warmup_steps=max(1, steps // 10),
                       bf16=cfg.bf16, seed=ctx.seed, progress=ctx.progress)
    trainer = DistillationTrainer(model, train, teacher=None if cfg.top_k else ctx.teacher,
                                  loss=loss, config=tcfg)
    history = trainer.train()
    model.eval()
    return history


def _apply_distil(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = _config_from(DistilStep, config, "step 'distil'")
    history = _distil_train(model, cfg, ctx)
    ctx.report("train_loss", [round(r["loss"], 5) for r in history["train"]])
    return model


QUANT_FORMATS = format_names()  # the built-in formats (quantization/formats.py); a recipe may name any registered one
# which formats each algorithm serves (None: every registered format)
QUANT_ALGORITHMS = {"rtn": None, "awq": ("int4",), "gptq": ("int4",), "awq+gptq": ("int4",), "smoothquant": ("w8a8",)}


def _format_config(knobs: dict, where: str, own: tuple) -> tuple:
    """A quantize/qat step's flat knobs split into the format's config and the step's ``own`` knobs.

    ``format:`` names the format in the registry (``quantization.registry.config_type``); the
    config's own fields build it, validated by the config itself, the config ``quantize_`` reads.
    """
    if "method" in knobs:
        raise ValueError(f"{where}: method={knobs['method']!r}; allowed: format (how the weights are stored: "
                         f"{', '.join(format_names())}), e.g. format: {knobs['method']}")
    knobs = dict(knobs)
    try:
        cls = config_type(knobs.pop("format", "int4"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    step = {k: knobs.pop(k) for k in own if k in knobs}
    return _config_from(cls, knobs, where, also=("format", *own)), step


@dataclass
class QuantizeStep:
    """Post-training quantization with real integer kernels: a registered format's config and the algorithm.

    A recipe writes it flat, ``{format: int4, group_size: 64, embedding_bits: 4, algorithm: awq}``:
    ``format`` picks the config type, the other keys but ``algorithm`` are that config's fields.
    """

    config: QuantizationConfig = field(default_factory=q.Int4WeightOnlyConfig)  # what quantize_ reads
    algorithm: str = "rtn"  # rtn (round to nearest), awq, gptq or awq+gptq (int4), smoothquant (w8a8); calibrated on pydoc train

    def __post_init__(self):
        fmt = format_for(self.config).format  # a registered format's config, else ValueError naming them
        if self.algorithm not in QUANT_ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}; allowed: {', '.join(QUANT_ALGORITHMS)}")
        serves = QUANT_ALGORITHMS[self.algorithm]
        if serves is not None and fmt not in serves:
            raise ValueError(f"algorithm={self.algorithm!r} with format={fmt!r}; allowed: algorithm "
                             f"{self.algorithm!r} needs format {' or '.join(serves)}")

    @classmethod
    def from_knobs(cls, knobs: dict) -> "QuantizeStep":
        """The step of a recipe's flat knobs (``format``, the config's fields, ``algorithm``)."""
        config, step = _format_config(knobs, "step 'quantize'", ("algorithm",))
        return _config_from(cls, {"config": config, **step}, "step 'quantize'")


def _quantized_kinds(model: nn.Module) -> dict:
    """Count the real quantized modules in ``model`` by kind."""

    kinds: dict = {}
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return kinds


def _validate_quantize(config: dict) -> None:
    QuantizeStep.from_knobs(config)


def _apply_quantize(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = QuantizeStep.from_knobs(config)
    config = cfg.config
    if cfg.algorithm in ("awq", "awq+gptq", "smoothquant"):
        stats = collect_activation_stats(model, ctx.calibration(), progress=False, seed=ctx.seed)
        if cfg.algorithm == "smoothquant":
            smooth_(model, SmoothQuantConfig(alpha=0.5), stats=stats)
        else:  # AWQ scaling first; awq+gptq then rounds the scaled weights with GPTQ (lesson 02's best one-shot)
            ctx.report("awq_exponents", dict(awq_(model, config, stats=stats, progress=False)))
    if cfg.algorithm in ("gptq", "awq+gptq"):
        summary = gptq_(model, config, calibration=ctx.calibration(), progress=False)
    else:
        summary = quantize_(model, config)
    ctx.report("quantized", _quantized_kinds(model))
    _report_kept_in_float(ctx, summary)
    return model


# where a qat step's training starts: the float weights; the same after AWQ scaling (an equivalent float model);
# or GPTQ's rounding of the AWQ-scaled weights, dequantized, so training starts on the best one-shot int4 grid
# (quantize with awq+gptq, then heal with KD through the fake quantizer)
QAT_STARTS = ("float", "awq", "awq+gptq")


@dataclass
class QATStep(DistilStep):
    """Quantization-aware training: fake-quantize the Linears, distil toward the teacher, convert to real int modules.

    A recipe writes it flat: ``format`` and the config's fields as in the quantize step, and the distil knobs.
    """

    config: QuantizationConfig = field(default_factory=q.Int4WeightOnlyConfig)  # the grid convert_ produces
    start: str = "float"  # the weights training starts from: float, awq (AWQ-scaled) or awq+gptq (GPTQ's int4 grid)
    embedding: bool = True  # train through the embedding's (and tied head's) rounding too (embedding_bits 4 or 8)

    def __post_init__(self):
        super().__post_init__()
        fmt = format_for(self.config).format  # a registered format's config, else ValueError naming them
        if not isinstance(self.embedding, bool):
            raise ValueError(f"embedding={self.embedding!r}; allowed: true or false")
        if self.start not in QAT_STARTS:
            raise ValueError(f"start={self.start!r}; allowed: {', '.join(QAT_STARTS)}")
        if self.start != "float" and fmt != "int4":
            raise ValueError(f"start={self.start!r} with format={fmt!r}; allowed: start 'float' for {fmt!r} "
                             f"(awq and awq+gptq serve int4)")

    @classmethod
    def from_knobs(cls, knobs: dict) -> "QATStep":
        """The step of a recipe's flat knobs (``format``, the config's fields, the distil knobs)."""
        config, step = _format_config(knobs, "step 'qat'", (*_DISTIL_KNOBS, "start", "embedding"))
        return _config_from(cls, {"config": config, **step}, "step 'qat'")

    def distil_step(self) -> DistilStep:
        """The distillation part of this step."""
        return DistilStep(**{name: getattr(self, name) for name in _DISTIL_KNOBS})


_DISTIL_KNOBS = tuple(f.name for f in dataclasses.fields(DistilStep))


def _validate_qat(config: dict) -> None:
    QATStep.from_knobs(config)


def _apply_qat(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = QATStep.from_knobs(config)
    if cfg.start != "float":
        stats = collect_activation_stats(model, ctx.calibration(), progress=False, seed=ctx.seed)
        ctx.report("awq_exponents", dict(awq_(model, cfg.config, stats=stats, progress=False)))
    if cfg.start == "awq+gptq":  # GPTQ's int4 weights, back in float: training starts on its grid
        gptq_(model, cfg.config, calibration=ctx.calibration(), progress=False)
        dequantize_(model)
    prepare_qat_(model, cfg.config, embedding=cfg.embedding)
    history = _distil_train(model, cfg.distil_step(), ctx)
    summary = convert_(model)
    ctx.report("train_loss", [round(r["loss"], 5) for r in history["train"]])
    ctx.report("quantized", dict(summary.replaced))
    _report_kept_in_float(ctx, summary)
    return model


register_step("layer_drop", _apply_layer_drop, _validate_layer_drop,
              "student = every k-th block of the current model (DistilBERT init); knobs: keep_every, layers")
register_step("prune", _apply_prune, lambda c: _prune_config(c),
              "structured pruning of heads / MLP channels / layers (distill_lab.pruning.StructuredConfig)")
register_step("distil", _apply_distil, _validate_distil,
              "distil toward the teacher from cached top-k logits; knobs: steps, batch_size, lr, kd_temperature, "
              "alpha, kind, top_k, bf16")
register_step("quantize", _apply_quantize, _validate_quantize,
              f"post-training quantization with integer kernels; knobs: format ({', '.join(QUANT_FORMATS)}), the "
              "format config's fields (int4: group_size, symmetric, bits; every format: embedding_bits, null, 8 or 4), "
              "algorithm (rtn, awq, gptq, awq+gptq, smoothquant)")
register_step("qat", _apply_qat, _validate_qat,
              "quantization-aware training with distillation, then real int modules; knobs: those of quantize "
              "and distil, start (float, awq or awq+gptq: the weights training starts from) and embedding (train "
              "through the embedding's rounding too)")
