"""The built-in formats, each registered once (``registry.register_format``): int8 weight-only, W8A8, int4 groups.

Each entry says how ``quantize_`` builds the format's module from an ``nn.Linear``, how QAT
fake-quantizes with the same rounding, how a saved folder rebuilds each module kind (the keys of
``export_tensors`` and ``spec``, unchanged since the first saved folders) and how ``export.to_gguf``
writes it (Q8_0 for int8 per row, Q4_1 for int4 groups of 32 and multiples). The embeddings of
``embedding_bits`` (int8 rows, int4 groups) register their module kinds alone: no config makes
them from a Linear. Modules that read or write formats import this one, so the table is full.
"""

from __future__ import annotations

import gguf
import torch

from .configs import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig
from .embeddings import Int4Embedding
from .ggml import QK, GGMLTensor, int4_q4_1_parts, q4_1_blocks, q8_0_blocks
from .modules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8Embedding, Int8WeightOnlyLinear, QuantizedModule
from .primitives import FakeQuantize, Granularity
from .registry import FormatSpec, ModuleFormat, register_format, register_module

__all__ = ["int4_to_ggml", "int8_to_ggml"]


def _on(tensors: dict, device) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def int8_to_ggml(module: QuantizedModule) -> GGMLTensor | None:
    """Q8_0 blocks of an int8-per-row module (codes kept, scales to fp16); None with a bias or rows not of 32s.

    A SmoothQuant factor is folded back into the weight, which ``gguf.quants`` then re-quantizes.
    """
    if getattr(module, "bias", None) is not None or module.weight_int8.shape[1] % QK:
        return None
    if getattr(module, "smooth", None) is not None:
        w = module.dequantized_weight().cpu().numpy()
        return GGMLTensor(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), "Q8_0",
                          note="SmoothQuant factor folded into the weight and re-quantized to Q8_0")
    return GGMLTensor(q8_0_blocks(module.weight_int8.cpu().numpy(), module.scales.float().cpu().numpy()), "Q8_0")


def int4_to_ggml(module: Int4WeightOnlyLinear | Int4Embedding) -> GGMLTensor | None:
    """Q4_1 blocks of an int4 module (same codes, ``d = scale``, ``m = zero - 8·scale``); None where Q4_1 cannot hold it.

    Q4_1 blocks are 32 wide, so the width and the group size must be multiples of 32; a bias has no place.
    """
    width = getattr(module, "in_features", getattr(module, "embedding_dim", 0))
    if getattr(module, "bias", None) is not None or width % QK or module.group_size % QK:
        return None
    codes, d, m, inexact = int4_q4_1_parts(module)
    return GGMLTensor(q4_1_blocks(codes, d, m, module.group_size), "Q4_1", groups=d.size, rounded=inexact)


# ----------------------------------------------------------------------------- int8 weight-only
def _int8_weight_only(tensors: dict, spec: dict, device) -> Int8WeightOnlyLinear:
    t = _on(tensors, device)
    return Int8WeightOnlyLinear(t["weight_int8"], t["scales"], t.get("bias"))


register_format(Int8WeightOnlyConfig, FormatSpec(
    format="int8",
    from_float=lambda linear, config: Int8WeightOnlyLinear.from_float(linear),
    weight_fake_quant=lambda config: FakeQuantize(8, None, True, -1),
    modules=(ModuleFormat("int8_weight_only", _int8_weight_only, int8_to_ggml, kernel="int8_weight_only",
                          tied=lambda emb, spec: Int8WeightOnlyLinear(emb.weight_int8, emb.scales)),),
    knobs={"int8": "rtn"}))


# ----------------------------------------------------------------------------- W8A8
def _int8_dynamic(tensors: dict, spec: dict, device) -> Int8DynamicLinear:
    t = _on(tensors, device)
    return Int8DynamicLinear(t["weight_int8"], t["scales"], t.get("bias"), spec["act_granularity"], t.get("smooth"))


def _w8a8_weight_fake_quant(config: Int8DynamicConfig) -> FakeQuantize:
    return FakeQuantize(8, None, True, -1 if config.weight_granularity == Granularity.PER_CHANNEL else None)


def _w8a8_act_fake_quant(config: Int8DynamicConfig) -> FakeQuantize:
    if config.act_granularity == Granularity.PER_TOKEN:
        return FakeQuantize(8, dynamic_per_token=True)
    return FakeQuantize(8, None, True, axis=None)


register_format(Int8DynamicConfig, FormatSpec(
    format="w8a8",
    from_float=lambda linear, config: Int8DynamicLinear.from_float(linear, config.act_granularity,
                                                                   config.weight_granularity),
    weight_fake_quant=_w8a8_weight_fake_quant,
    act_fake_quant=_w8a8_act_fake_quant,
    modules=(ModuleFormat("int8_dynamic", _int8_dynamic, int8_to_ggml, kernel="w8a8",
                          tied=lambda emb, spec: Int8DynamicLinear(emb.weight_int8, emb.scales, None,
                                                                   spec["act_granularity"])),),
    knobs={"w8a8": "rtn", "w8a8 + SmoothQuant": "smoothquant"}))


# ----------------------------------------------------------------------------- int4 groups
def _int4_tied(emb, spec: dict) -> Int4WeightOnlyLinear:
    if not isinstance(emb, Int4Embedding):
        raise ValueError(f"an int4 head is tied to a {emb.kind} module; allowed: an int4_embedding")
    return emb.tied_head()


register_format(Int4WeightOnlyConfig, FormatSpec(
    format="int4",
    from_float=lambda linear, config: Int4WeightOnlyLinear.from_float(linear, config.group_size, config.bits,
                                                                      config.symmetric),
    fits=lambda in_features, config: in_features % config.group_size == 0,
    weight_fake_quant=lambda config: FakeQuantize(config.bits, config.group_size, config.symmetric, -1),
    modules=(ModuleFormat("int4_weight_only", Int4WeightOnlyLinear.from_exported, int4_to_ggml, kernel="int4",
                          tied=_int4_tied),),
    knobs={"int4": "rtn", "int4 + AWQ": "awq", "int4 + AWQ + GPTQ": "awq+gptq"}))


# ----------------------------------------------------------------------------- embeddings (embedding_bits)
def _int8_embedding(tensors: dict, spec: dict, device) -> Int8Embedding:
    t = _on(tensors, device)
    return Int8Embedding(t["weight_int8"], t["scales"], getattr(torch, spec.get("out_dtype", "float32")),
                         spec.get("embed_scale", 1.0))


register_module(ModuleFormat("int8_embedding", _int8_embedding, int8_to_ggml))
register_module(ModuleFormat("int4_embedding", Int4Embedding.from_exported, int4_to_ggml))
