"""The torchao-style entry point: ``quantize_(model, config, filter_fn)`` swaps modules in place; then measure sizes.

``quantize_`` replaces every ``nn.Linear`` (and, per ``config.embedding_bits``, the token embedding
and the output head) with the real quantized module of ``config``, and returns a
``QuantizationSummary`` that says what stayed in float and why. ``memory_bytes``,
``fp32_equivalent_bytes`` and ``compression_report`` measure what the swap saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from ..arch import check_linear_layout, swap_guard
from ..runtime import device_of
from ..serialization import weights_bytes
from ..summary import Summary
from ..tensors import memory_bytes, storage_key, unique_tensors
from . import formats  # noqa: F401  the built-in formats register themselves
from .configs import Int8DynamicConfig, config_to_dict
from .embeddings import INT4_EMBEDDING_GROUP, Int4Embedding
from .modules import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8Embedding, Int8WeightOnlyLinear, QuantizedModule,
                      embedding_and_head, module_name, set_module)
from .dispatch import FIXED, check_env, kernel_paths
from .primitives import check_finite, quantize_tensor
from .registry import format_for, module_format

__all__ = ["KeptInFloat", "QuantizationSummary", "Reason", "compression_report", "dequantize_", "fp32_equivalent_bytes",
           "linear_from_config",
           "memory_bytes", "misfit", "quantize_", "quantize_embedding_and_head_"]



class Reason(str, Enum):
    """Why ``quantize_`` (or QAT's ``convert_``) left a module in float."""

    FILTER_FN = "filter_fn"  # the caller's filter_fn excluded it
    GROUP_SIZE = "group_size"  # config.group_size does not divide its input width
    EMBEDDING_BITS = "embedding_bits"  # config.embedding_bits is None: embedding and head stay in float
    NOT_AN_EMBEDDING = "not_an_embedding"  # the input embedding is not an nn.Embedding
    EMBEDDING_GROUP = "embedding_group"  # the int4 embedding's group does not divide embedding_dim
    FORMAT = "format"  # a registered format's fits() refused the layer's shape


@dataclass(frozen=True)
class KeptInFloat:
    """A module that stayed in float: a ``Reason`` to test, and the ``detail`` that is printed (its ``str``)."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return self.detail

    def to_dict(self) -> dict:
        """JSON-ready form, as a recipe step records it."""
        return {"reason": self.reason.value, "detail": self.detail}

    @classmethod
    def from_dict(cls, value: dict) -> "KeptInFloat":
        """Back from ``to_dict`` (a step record read from disk)."""
        return cls(Reason(value["reason"]), value["detail"])


def misfit(in_features: int, config) -> KeptInFloat:
    """Why a Linear that ``config``'s format cannot take stays in float (int4: the group size does not divide it)."""
    group = getattr(config, "group_size", None)
    if group is not None:
        return KeptInFloat(Reason.GROUP_SIZE, f"in_features={in_features} not divisible by group_size={group}")
    return KeptInFloat(Reason.FORMAT, f"in_features={in_features} does not fit {type(config).__name__}")


@dataclass(repr=False, eq=False)
class QuantizationSummary(Summary):
    """What ``quantize_`` (``convert_``, ``gptq_``) did: {module name: its quantized kind}, and in ``kept`` the
    modules left in float, each with its ``KeptInFloat`` reason."""

    technique: str = "quantize_"
    unit: str = "quantized kind"
    tied_head: bool = False  # True when the head shares the embedding's codes and scales (int8 or int4)
    paths: dict = field(default_factory=dict)  # kind -> {phase: path} where a phase leaves its fixed path here

    def add(self, name: str, kind: str) -> None:
        """Record that module ``name`` became a quantized module of ``kind``."""
        self.changed[name] = kind

    @property
    def replaced(self) -> dict:
        """{kind: how many modules became that kind}, in the order first seen."""
        counts = {}
        for kind in self.changed.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    @property
    def float_modules(self) -> dict:
        """{module name: KeptInFloat}: the modules left in float (the same dict as ``kept``)."""
        return self.kept

    def __repr__(self) -> str:
        kinds = ", ".join(f"{v}× {k}" for k, v in self.replaced.items()) or "nothing"
        floats = "; ".join(f"{k} ({v})" for k, v in self.float_modules.items()) or "none"
        paths = "; ".join(f"{k} {ph} runs {p} on this CPU, not {FIXED[module_format(k).kernel][ph]} (doctor shows why)"
                          for k, by_phase in self.paths.items() for ph, p in by_phase.items())
        return (f"QuantizationSummary({self.config['type']}: {kinds}; kept in float: {floats}"
                + (f"; {paths}" if paths else "") + ")")

    def note_paths(self, device: torch.device) -> None:
        """Record the phases where this CPU's dispatch (measured or forced) leaves a replaced kind's fixed path."""
        if device.type != "cpu":
            return
        chosen = kernel_paths()
        for kind in self.replaced:
            fmt = module_format(kind).kernel  # the dispatch format whose measured paths the kind follows
            if fmt is None:
                continue
            moved = {ph: p for ph, p in chosen[fmt].items() if p != FIXED[fmt][ph]}
            if moved:
                self.paths[kind] = moved


def linear_from_config(linear: nn.Linear, config) -> QuantizedModule | None:
    """The quantized module ``config``'s registered format turns ``linear`` into (None: the format does not fit it,
    e.g. int4 groups that do not divide its inputs).

    Duck-typed: anything with ``.weight``, ``.bias`` and ``.in_features`` works (QAT's ``QATLinear``).
    """
    spec = format_for(config)
    if not spec.fits(linear.in_features, config):
        return None
    return spec.from_float(linear, config)


def _head_module(weight_int8: torch.Tensor, scales: torch.Tensor, config, bias=None) -> QuantizedModule:
    """The int8 output head for a config (shares the embedding's tensors when tied)."""
    if isinstance(config, Int8DynamicConfig) and config.head == "w8a8":
        return Int8DynamicLinear(weight_int8, scales, bias, config.act_granularity)
    return Int8WeightOnlyLinear(weight_int8, scales, bias)


def _tied_head(qemb: QuantizedModule, config, bias: torch.Tensor | None = None) -> QuantizedModule:
    """The head over the quantized embedding's own tensors (stored once), with the float head's own ``bias``.

    A tied head may still have a bias of its own (BERT and RoBERTa decoders, Phi with tied embeddings):
    it is kept, as a copy (its float parameter may stay in the model under another name).
    """
    bias = None if bias is None else bias.detach().float().clone()  # (V,)
    if isinstance(qemb, Int4Embedding):
        head = qemb.tied_head()  # int4 weight-only kernel over the embedding's packed codes
        head.bias = bias
        return head
    return _head_module(qemb.weight_int8, qemb.scales, config, bias)


def _untied_head(head: nn.Linear, config) -> QuantizedModule:
    """A head with weights of its own, on the grid of ``config.embedding_bits`` (int4 groups of 64, or int8 rows)."""
    if config.embedding_bits == 4:
        return Int4WeightOnlyLinear.from_float(head, INT4_EMBEDDING_GROUP)
    q = quantize_tensor(head.weight, 8, None, True, -1)
    return _head_module(q.codes, q.scales.reshape(-1), config, head.bias)


def quantize_(model: nn.Module, config, filter_fn=None) -> QuantizationSummary:
    """Replace the model's ``nn.Linear`` (and, per config, embedding and head) with real quantized modules, in place.

    ``filter_fn(module, name) -> bool`` picks which Linear layers to quantize (default: all but
    the output head, which follows ``config.embedding_bits``). Returns a summary that says what
    stayed in float.
    """
    spec = format_for(config)  # a registered format, else ValueError naming the registered ones
    check_linear_layout(model, "quantize_")  # Conv1D / 3-D expert weights would be skipped silently
    for name, module in model.named_modules():  # refuse NaN/Inf before anything is replaced
        if isinstance(module, (nn.Linear, nn.Embedding)):
            check_finite(module.weight.detach(), f"{name}.weight" if name else "weight")
    if hasattr(config, "group_size"):  # a grouped format that fits no layer would quantize nothing
        head = embedding_and_head(model)[1]
        eligible = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
                    and (filter_fn is None or filter_fn(m, n))]
        done = any(isinstance(m, QuantizedModule) for m in model.modules())  # gptq_ replaced the rest already
        if eligible and not done and not any(spec.fits(m.in_features, config) for _, m in eligible):
            widths = sorted({m.in_features for _, m in eligible})
            raise ValueError(f"{type(config).__name__}.group_size={config.group_size} divides none of the "
                             f"{len(eligible)} layers' input widths {widths}; allowed: a divisor of one of them")
    summary = QuantizationSummary(config=config_to_dict(config))
    if device_of(model).type == "cpu":  # the kernel paths are measured (or read) here, not inside the swap guard
        check_env()
        kernel_paths()
    with swap_guard(model, "quantize_"):  # the model must still run afterwards, else it is put back
        head_name = module_name(model, embedding_and_head(model)[1])
        quantize_embedding_and_head_(model, config, summary)

        # 2. every other Linear
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name == head_name:
                continue
            if filter_fn is not None and not filter_fn(module, name):
                summary.float_modules[name] = KeptInFloat(Reason.FILTER_FN, "filter_fn")
                continue
            qmod = linear_from_config(module, config)
            if qmod is None:
                summary.float_modules[name] = misfit(module.in_features, config)
                continue
            set_module(model, name, qmod)
            summary.add(name, qmod.kind)
        model.quantization_config = config_to_dict(config)  # read by save_quantized
    summary.note_paths(device_of(model))
    return summary


def dequantize_(model: nn.Module) -> Summary:
    """Replace every quantized module that holds weights (Linears, the embedding and its head) with a float32 one
    holding exactly its dequantized weight, in place: the inverse of ``quantize_`` up to rounding.

    What this is for: a model whose weights lie on a quantization grid (e.g. after GPTQ) that should train
    further, as quantization-aware training does, from that grid. A tied head is tied again. Returns a
    ``Summary``: {module: the kind it was}.
    """
    summary = Summary("dequantize_", {}, unit="module")
    for name, m in list(model.named_modules()):
        if isinstance(m, (Int8Embedding, Int4Embedding)):  # skip_init: no random init, overwritten at once
            new = torch.nn.utils.skip_init(nn.Embedding, m.num_embeddings, m.embedding_dim)
        elif isinstance(m, QuantizedModule) and hasattr(m, "dequantized_weight"):
            new = torch.nn.utils.skip_init(nn.Linear, m.in_features, m.out_features,
                                           bias=getattr(m, "bias", None) is not None)
            if new.bias is not None:
                new.bias.data = m.bias.detach().float().cpu()
        else:
            continue
        new.weight.data = m.dequantized_weight().float().cpu()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        summary.changed[name] = getattr(m, "kind", type(m).__name__)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    left = any(isinstance(m, (QuantizedModule, Int8Embedding, Int4Embedding)) for m in model.modules())
    if not left and hasattr(model, "quantization_config"):
        del model.quantization_config  # a float model again: saved as one
    return summary


def quantize_embedding_and_head_(model: nn.Module, config,
                                 summary: QuantizationSummary | None = None) -> QuantizationSummary:
    """Quantize the token embedding and the output head with it (shared codes when tied), per ``config.embedding_bits``.

    8: int8 rows (``Int8Embedding``) and an int8 head. 4: asymmetric int4 groups of 64 along the
    hidden dim (``Int4Embedding``) and a head on the int4 weight-only kernel; a hidden size that 64
    does not divide keeps both in float, with the reason in the summary (as Linear layers do).
    Returns ``summary`` (a new one when None) with both recorded. The tied 49k × 576 head is the
    largest single matmul of a decode step, so leaving it in float caps the speed-up.
    """
    summary = summary if summary is not None else QuantizationSummary(config=config_to_dict(config))
    emb, head = embedding_and_head(model)
    emb_name, head_name = module_name(model, emb), module_name(model, head)
    bits = config.embedding_bits
    reason = (KeptInFloat(Reason.EMBEDDING_BITS, f"embedding_bits={bits}") if bits is None
              else KeptInFloat(Reason.NOT_AN_EMBEDDING, "the input embedding is not an nn.Embedding"))
    if bits == 4 and isinstance(emb, nn.Embedding) and emb.embedding_dim % INT4_EMBEDDING_GROUP:
        reason = KeptInFloat(Reason.EMBEDDING_GROUP, f"embedding_dim={emb.embedding_dim} not divisible by the "
                                                     f"int4 embedding group size {INT4_EMBEDDING_GROUP}")
    elif bits is not None and isinstance(emb, nn.Embedding):
        tied = isinstance(head, nn.Linear) and head.weight is emb.weight
        qemb = Int8Embedding.from_float(emb) if bits == 8 else Int4Embedding.from_float(emb, INT4_EMBEDDING_GROUP)
        set_module(model, emb_name, qemb)
        summary.add(emb_name, qemb.kind)
        if isinstance(head, nn.Linear):
            qhead = _tied_head(qemb, config, head.bias) if tied else _untied_head(head, config)  # tied: same codes
            set_module(model, head_name, qhead)
            summary.tied_head = tied
            summary.add(head_name, qhead.kind)
        return summary
    if emb_name is not None and isinstance(emb, nn.Embedding):
        summary.float_modules[emb_name] = reason
    if head_name is not None and isinstance(head, nn.Linear):
        summary.float_modules[head_name] = KeptInFloat(reason.reason, f"output head follows {reason}")
    return summary


# ----------------------------------------------------------------------------- sizes
def _all_tensors(model: nn.Module) -> list[torch.Tensor]:
    return unique_tensors(list(model.parameters()) + list(model.buffers()))


def fp32_equivalent_bytes(model: nn.Module) -> int:
    """What the model's weights would take in fp32 (quantized modules counted by the weights they stand for)."""
    total, seen = 0, set()
    quantized = set()  # tensors owned by quantized modules
    for m in model.modules():
        if not isinstance(m, QuantizedModule):
            continue
        own = {storage_key(b) for b in m.buffers(recurse=False)}
        main = storage_key(next(iter(m.buffers(recurse=False))))  # codes
        quantized |= own
        if main in seen:  # a tied head that shares the embedding's codes
            continue
        seen.add(main)
        bias = getattr(m, "bias", None)
        total += 4 * (m.logical_numel() + (0 if bias is None else bias.numel()))
    for t in _all_tensors(model):
        if t.is_floating_point() and storage_key(t) not in quantized:
            total += 4 * t.numel()
    return total


def compression_report(model: nn.Module, fp32_bytes: int | None = None, on_disk: bool = True) -> dict:
    """Measured size of a model in memory and on disk, its ratio to fp32 and the memory saved.

    ``fp32_bytes`` defaults to the fp32 size of the weights the model stands for; the disk size
    is the safetensors file ``save_quantized`` writes (measured, not estimated).
    """
    mem = memory_bytes(model)
    ref = fp32_equivalent_bytes(model) if fp32_bytes is None else int(fp32_bytes)
    report = {"memory_bytes": mem, "fp32_bytes": ref, "ratio_memory": ref / mem,
              "memory_saved_bytes": ref - mem}
    if on_disk:
        disk = weights_bytes(model)
        report.update(disk_bytes=disk, ratio_disk=ref / disk)
    kinds, floats = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            floats.append(name)
    report["quantized_modules"] = kinds
    report["float_modules"] = floats
    return report
