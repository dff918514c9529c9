"""Export a quantized model to compressed-tensors, the Hugging Face folder format that vLLM serves.

compressed-tensors (https://github.com/vllm-project/compressed-tensors) is the checkpoint format of
llm-compressor (https://github.com/vllm-project/llm-compressor): a plain HF folder whose config.json
holds a ``quantization_config`` with ``quant_method: compressed-tensors``, read by vLLM
(``vllm serve DIR``) and by transformers (``CompressedTensorsConfig``). The tensor names, dtypes and
packing below are those of the installed compressors (0.20: ``compressors/pack_quantized`` and
``compressors/naive_quantized``); ``tests/test_export_ct.py`` reads them back with the library.

How distill_lab's modules map, with our codes and scales written unchanged (no second rounding):

* ``Int8WeightOnlyLinear`` (W8A16) -> format ``pack-quantized``, 8-bit ``channel`` weights, symmetric:
  ``weight_packed`` int32 (N, K/4), ``weight_scale`` fp32 (N, 1), ``weight_shape`` int64 [N, K].
  compressed-tensors infers this format for every int weight-only scheme (``compressors/format.py``),
  and vLLM's W8A16 path (``CompressedTensorsWNA16``) reads only this packing.
* ``Int8DynamicLinear`` (W8A8) -> format ``int-quantized``: ``weight`` int8 (N, K), ``weight_scale``
  fp32 (N, 1); ``input_activations`` 8-bit, ``dynamic``, ``token`` (or ``tensor``) strategy. The
  activation scales are computed at run time by whoever runs the file (vLLM, compressed-tensors).
* ``Int4WeightOnlyLinear``, symmetric (W4A16) -> format ``pack-quantized``, 4-bit ``group`` weights:
  ``weight_packed`` int32 (N, K/8), ``weight_scale`` bf16 (N, K/g), ``weight_shape``. Our kernel
  code ``q`` in [0, 15] means ``(q - 8)·scale`` (zero 0 when symmetric); compressed-tensors stores
  the signed code ``c = q - 8`` plus 8 in the same nibble, element ``k`` at bits ``4k`` of the row:
  the same nibbles as our portable ``pack_int4``. ``bits`` 2 or 3 use the same 4-bit container.

What compressed-tensors cannot hold exactly raises ``ValueError`` naming the module:

* asymmetric int4 (our default grid): its zero is a bf16 *float* per group, ``w = (q - 8)·s + z``;
  the format's zero point is an *integer* code, ``w = (c - zp)·s``, which cannot equal it;
* a SmoothQuant factor left unfolded in a W8A8 layer (``smooth``), a W8A8 head, mixed schemes,
  sparse (CSR) or other layers with no mapping, and shapes the model's config cannot describe
  (per-layer widths: transformers' configs hold one ``intermediate_size`` and one head count).

The token embedding and the output head go in float (fp32), as the exact values their int8/int4
codes stand for: vLLM's compressed-tensors integration quantizes Linear layers only (its embedding
and ``lm_head`` load float weights), so a quantized table would not serve there. The head is
listed in ``ignore`` with every Linear that ``quantize_`` left in float.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from ._fs import atomic_folder
from ._hf import quiet_transformers
from .pipeline.publish import EXPORT_KIND, check_out
from .quantization.modules import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear, QuantizedModule,
                                   embedding_and_head, module_name)
from .tensors import same_tensor

__all__ = ["CompressedTensorsExport", "QUANT_METHOD", "WEIGHTS_NAME", "pack_int32", "quantization_config",
           "to_compressed_tensors"]

QUANT_METHOD = "compressed-tensors"
WEIGHTS_NAME = "model.safetensors"
_LINEAR_KINDS = ("Int8WeightOnlyLinear", "Int8DynamicLinear", "Int4WeightOnlyLinear (symmetric)", "nn.Linear")


@dataclass
class CompressedTensorsExport:
    """What ``to_compressed_tensors`` wrote: the folder, its format, which modules went in quantized or in float."""

    folder: Path
    format: str  # pack-quantized (W8A16, W4A16) or int-quantized (W8A8)
    quantization_config: dict  # the config.json entry
    quantized: dict = field(default_factory=dict)  # module name -> our kind, written with our codes and scales
    ignore: list = field(default_factory=list)  # Linear modules written in float
    notes: list = field(default_factory=list)  # one line per module whose codes became float values

    def summary(self) -> str:
        """One line: folder, size, format, modules quantized and left in float."""
        size = sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) / 2**20
        return (f"{self.folder.name}/: {size:.1f} MiB of weights, compressed-tensors {self.format}: "
                f"{len(self.quantized)} Linear layers with our codes and scales, {len(self.ignore)} in float "
                f"({', '.join(self.ignore[:3]) or 'none'}{' ...' if len(self.ignore) > 3 else ''})")


# ----------------------------------------------------------------------------- packing
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) signed codes -> (N, ceil(K·bits/32)) int32, compressed-tensors' ``pack_to_int32`` layout.

    Each code plus ``2^(bits-1)`` is an unsigned ``bits``-wide field; code ``k`` of a row sits at bits
    ``bits·k`` of the row's int32 words, counted from the least significant bit of word 0; a last
    partial word is padded with zero fields. Only ``bits`` that divide 32 (4, 8) are needed here.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}; allowed: 4 or 8")
    per = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))  # (N, K) in [0, 2^bits)
    if bool(((u < 0) | (u >= 1 << bits)).any()):
        raise ValueError(f"codes outside the signed {bits}-bit range [{-(1 << (bits - 1))}, {(1 << (bits - 1)) - 1}]")
    n, k = u.shape
    u = torch.nn.functional.pad(u, (0, -k % per))  # (N, W·per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u.reshape(n, -1, per) << shifts).sum(-1)  # (N, W) in [0, 2^32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


# ----------------------------------------------------------------------------- schemes
def _args(bits: int, strategy: str, group_size: int | None = None, dynamic: bool = False) -> dict:
    """One ``QuantizationArgs`` as compressed-tensors serializes it (``model_dump``; symmetric ints only)."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "group_size": group_size, "strategy": strategy,
            "dynamic": dynamic}


def _scheme(module: QuantizedModule, name: str) -> tuple[str, dict, dict | None]:
    """(format, weight args, input-activation args) of one quantized Linear; ValueError where none is exact."""
    if isinstance(module, Int8WeightOnlyLinear):
        return "pack-quantized", _args(8, "channel"), None
    if isinstance(module, Int8DynamicLinear):
        if module.smooth is not None:
            raise ValueError(f"{name}: W8A8 layer with an unfolded SmoothQuant factor (smooth, {module.in_features} "
                             "values) has no compressed-tensors form; allowed: factors folded into the previous "
                             "norm or Linear (smooth_ does so)")
        strategy = "token" if module.act_granularity.value == "per_token" else "tensor"
        return "int-quantized", _args(8, "channel"), _args(8, strategy, dynamic=True)
    if isinstance(module, Int4WeightOnlyLinear):
        if not module.symmetric or bool(module.scales_and_zeros[..., 1].any()):
            raise ValueError(f"{name}: asymmetric int4 (float zero point per group, w = (q - 8)*s + z) has no exact "
                             "compressed-tensors form, whose zero points are integer codes; allowed: "
                             "Int4WeightOnlyConfig(symmetric=True) (also for awq_ and gptq_)")
        return "pack-quantized", _args(4, "group", module.group_size), None
    raise ValueError(f"{name}: {type(module).__name__} ({getattr(module, 'kind', '?')}) has no compressed-tensors "
                     f"mapping; allowed Linear layers: {', '.join(_LINEAR_KINDS)}")


def _tensors(module: QuantizedModule) -> dict[str, torch.Tensor]:
    """The module's compressed-tensors tensors (local names), our codes and scales unchanged; bias kept."""
    out = {}
    if isinstance(module, Int8DynamicLinear):  # per-tensor weight scales are stored expanded: N equal values
        out["weight"] = module.weight_int8.cpu().contiguous()  # (N, K) int8
        out["weight_scale"] = module.scales.float().cpu().reshape(-1, 1)  # (N, 1) fp32
    elif isinstance(module, Int8WeightOnlyLinear):
        out["weight_packed"] = pack_int32(module.weight_int8.cpu(), 8)  # (N, K/4) int32
        out["weight_scale"] = module.scales.float().cpu().reshape(-1, 1)  # (N, 1) fp32
        out["weight_shape"] = torch.tensor([module.out_features, module.in_features])  # int64
    else:  # symmetric int4: kernel code q = c + 8, zero 0 (checked in _scheme)
        codes = module.codes().cpu().to(torch.int16) - 8  # (N, K) signed, in [-8, 7]
        out["weight_packed"] = pack_int32(codes, 4)  # (N, K/8) int32
        out["weight_scale"] = module.scales_and_zeros[..., 0].t().cpu().contiguous()  # (N, K/g) bf16, ours
        out["weight_shape"] = torch.tensor([module.out_features, module.in_features])
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias.detach().cpu().clone()
    return out


def quantization_config(fmt: str, weights: dict, activations: dict | None, ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json: one config group over every quantized Linear."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations,
             "output_activations": None, "format": fmt}
    return {"quant_method": QUANT_METHOD, "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


# ----------------------------------------------------------------------------- the model
def _float_weight(module: nn.Module) -> torch.Tensor:
    """The float table or weight a module computes with: our int8/int4 codes times scales, in fp32 (exact)."""
    if isinstance(module, QuantizedModule):
        return module.dequantized_weight().float().cpu()
    return module.weight.detach().cpu().clone()  # a copy: an untied head may still share the embedding's memory


def _codes_of(module: nn.Module | None) -> torch.Tensor | None:
    """The tensor a module's weight lives in (int8 codes, packed int4 codes, float weight): shared by a tied head."""
    for attr in ("weight_int8", "packed", "weight"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _embedding_and_head(model: nn.Module, cfg, out: dict, notes: list) -> tuple[str | None, bool]:
    """Write the embedding and head in float into ``out``; return (head name, tied)."""
    emb, head = embedding_and_head(model)
    emb_name, head_name = module_name(model, emb), module_name(model, head)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and same_tensor(_codes_of(emb), _codes_of(head))
    if isinstance(head, Int8DynamicLinear):
        raise ValueError(f"{head_name}: a W8A8 output head has no compressed-tensors form that vLLM serves (lm_head "
                         "loads float weights there); allowed: Int8DynamicConfig(head='weight_only')")
    for name, module in ((emb_name, emb), (None if tied else head_name, head)):
        if name is None or module is None:
            continue
        out[f"{name}.weight"] = _float_weight(module)
        if getattr(module, "bias", None) is not None:
            out[f"{name}.bias"] = module.bias.detach().cpu().clone()
        if isinstance(module, QuantizedModule):
            notes.append(f"{name}: {module.kind} written as its fp32 values (codes x scales, exact)")
    return head_name, tied


def _linears(model: nn.Module, skip: set[str], out: dict) -> tuple[dict, list, set]:
    """Quantized and float Linears (not the head): {name: kind}, the float names, the scheme(s) met."""
    quantized, floats, schemes = {}, [], set()
    for name, module in model.named_modules():
        if name in skip or not name:
            continue
        if isinstance(module, QuantizedModule):
            fmt, w, a = _scheme(module, name)
            schemes.add(json.dumps([fmt, w, a], sort_keys=True))
            out.update({f"{name}.{k}": v for k, v in _tensors(module).items()})
            quantized[name] = module.kind
        elif isinstance(module, nn.Linear):
            floats.append(name)
    if len(schemes) > 1:
        kinds = ", ".join(sorted(set(quantized.values())))
        raise ValueError(f"{len(schemes)} quantization schemes in one model ({kinds}); allowed: one scheme for every "
                         "quantized Linear (one compressed-tensors config group)")
    return quantized, floats, schemes


def _float_state(model: nn.Module, taken: set[str]) -> dict:
    """Every other persistent tensor of ``model`` (norms, float Linears), cloned; ``taken``: modules written already."""
    out = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if any(owner == t or owner.startswith(t + ".") for t in taken):
            continue
        out[key] = value.detach().cpu().clone().contiguous()
    return out


def _reference(cfg) -> nn.Module:
    """A weightless (meta) model of the exported config, without its quantization: the shapes a reload builds."""
    plain = copy.deepcopy(cfg)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    with torch.device("meta"), quiet_transformers():
        return AutoModelForCausalLM.from_config(plain)


def _check_modules(model: nn.Module, ref: nn.Module) -> None:
    """Refuse weight-holding modules the reloaded model would not have (CSR layers, QAT wrappers, extra modules)."""
    ref_modules = dict(ref.named_modules())
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            continue
        other = ref_modules.get(name)
        fits = isinstance(other, (nn.Linear, nn.Embedding)) if isinstance(module, QuantizedModule) \
            else type(other) is type(module)
        if not fits:
            raise ValueError(f"{name}: {type(module).__name__} has no compressed-tensors mapping in a "
                             f"{type(ref).__name__}; allowed Linear layers: {', '.join(_LINEAR_KINDS)}")


def _logical_shapes(tensors: dict, quantized: dict) -> dict[str, tuple]:
    """{state-dict key: shape} as the float model sees it: a quantized Linear's ``weight`` is its (N, K)."""
    shapes = {}
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner not in quantized:
            shapes[key] = tuple(value.shape)
        elif leaf == "weight_shape":
            shapes[f"{owner}.weight"] = tuple(value.tolist())
        elif leaf in ("weight", "bias"):  # W8A8's int8 weight is (N, K) as it is
            shapes[key] = tuple(value.shape)
    return shapes


def _check_shapes(ref: nn.Module, tensors: dict, quantized: dict, tied_key: str | None) -> None:
    """Refuse a model whose layers the exported config would not rebuild (e.g. pruned to per-layer widths)."""
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != tied_key}
    got = _logical_shapes(tensors, quantized)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ValueError(f"{key}: the model holds shape {got.get(key)}, its config rebuilds {want.get(key)}; "
                             "allowed: layers of the widths config.json describes (one intermediate_size and one "
                             "head count for every layer, as prune_structured keeps them)")


def to_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | Path, *,
                          overwrite: bool = False) -> CompressedTensorsExport:
    """Write ``model`` (quantized by ``quantize_``, ``awq_`` or ``gptq_``, pruned or not) as a compressed-tensors
    folder: ``model.safetensors``, ``config.json`` with its ``quantization_config``, the tokenizer's files.

    ``out_dir`` must be new or empty, or (with ``overwrite``) an earlier distill-lab export nobody
    added to; it appears whole or not at all (``_fs.atomic_folder``). Raises ``ValueError`` naming
    the module for what the format cannot hold exactly (see the module docstring).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    check_out(out_dir, overwrite)  # before any work
    ref = _reference(model.config)
    _check_modules(model, ref)  # CSR or QAT layers: refused before their tensors are read
    cfg, tensors, notes = copy.deepcopy(model.config), {}, []
    emb_name = module_name(model, embedding_and_head(model)[0])
    head_name, tied = _embedding_and_head(model, cfg, tensors, notes)
    quantized, floats, schemes = _linears(model, {emb_name, head_name}, tensors)
    if not schemes:
        raise ValueError("the model has no quantized Linear layer; allowed: a model quantized with "
                         "Int8WeightOnlyConfig, Int8DynamicConfig or Int4WeightOnlyConfig(symmetric=True) "
                         "(a float model: save_model)")
    fmt, weights, acts = json.loads(schemes.pop())
    if acts and acts["strategy"] == "tensor":
        notes.append("W8A8 with dynamic per-tensor activations: transformers runs it; vLLM's int8 W8A8 kernels take "
                     "dynamic per-token (or static per-tensor) activations only")
    ignore = ([head_name] if head_name else []) + floats
    cfg.tie_word_embeddings = tied
    cfg.quantization_config = quantization_config(fmt, weights, acts, ignore)
    tensors.update(_float_state(model, set(quantized) | {n for n in (emb_name, head_name) if n}))
    _check_shapes(ref, tensors, quantized, f"{head_name}.weight" if tied else None)
    with atomic_folder(out_dir, kind=EXPORT_KIND, extra={"export_format": QUANT_METHOD}, ours_only=False) as tmp:
        _write(tmp, model, cfg, tensors, tokenizer)
        check_out(out_dir, overwrite)  # again: nothing appeared meanwhile
    return CompressedTensorsExport(out_dir, fmt, cfg.quantization_config, quantized, ignore, notes)


def _write(folder: Path, model: nn.Module, cfg, tensors: dict, tokenizer) -> None:
    """model.safetensors, config.json, generation_config.json and the tokenizer files into ``folder``."""
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg.to_json_file(str(folder / "config.json"))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(str(folder / "generation_config.json"))
    if tokenizer is not None:
        with quiet_transformers():
            tokenizer.save_pretrained(str(folder))
