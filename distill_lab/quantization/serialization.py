"""Saving and loading quantized models: one safetensors file of packed tensors plus the configs to rebuild them.

The packed int4 codes are written in a portable layout (``pack_int4``) and re-packed for the
kernel of the device they are loaded on. A head that shares the embedding's codes (int8, or the
packed int4 codes, scales and zeros of ``embedding_bits=4``) is written once and tied again on load.
Low on purpose: it knows the registered module kinds (``registry``), not ``quantize_``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .._folder import check_model_folder
from .._fs import atomic_folder
from ..profiles import default_device
from ..tensors import storage_key
from . import formats  # noqa: F401  the built-in formats register their module kinds
from .modules import QuantizedModule, embedding_and_head, module_name, set_module
from .registry import module_format

__all__ = ["FORMAT", "QCONFIG_NAME", "WEIGHTS_NAME", "load_quantized", "save_quantized"]

FORMAT = "distill_lab.quantized/1"  # tag written into saved checkpoints
WEIGHTS_NAME = "model.safetensors"
QCONFIG_NAME = "quantization_config.json"


def _persistent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without quantized modules' buffers and without non-persistent buffers."""
    qnames = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    state = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(q + ".") for q in qnames):
            continue
        state[k] = v
    return state


def save_quantized(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Save a (quantized or float) HF model as one safetensors file of packed tensors plus its configs; atomic."""
    folder = Path(folder)
    tensors, modules, owners = {}, {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedModule):
            continue
        spec = m.spec()
        shared = [owners.get(storage_key(b)) for b in m.buffers(recurse=False) if b.numel() > 1]
        shared = [s for s in shared if s is not None]
        if shared and module_format(m.kind).tied is not None:  # a head that may share an embedding's tensors
            spec["tied_to"] = shared[0]  # shares the embedding's codes and scales
            if getattr(m, "bias", None) is not None:  # a tied head's own bias (BERT, Phi): not the embedding's
                tensors[f"{name}.bias"] = m.bias.detach().cpu().clone()
            modules[name] = spec
            continue
        for b in m.buffers(recurse=False):
            owners.setdefault(storage_key(b), name)
        for k, v in m.export_tensors().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
        modules[name] = spec
    seen = {storage_key(v): k for k, v in tensors.items()}
    tied_float = {}  # name -> the saved name of the same tensor (a tied weight, BERT's shared decoder bias)
    for k, v in _persistent_state(model).items():
        if storage_key(v) in seen:  # shared tensors: saved once, tied again on load
            tied_float[k] = seen[storage_key(v)]
            continue
        seen[storage_key(v)] = k
        tensors[k] = v.detach().cpu().contiguous()
    qconfig = {"format": FORMAT, "config": getattr(model, "quantization_config", None), "modules": modules,
               "tied_float": tied_float}
    meta = {"distill_lab": json.dumps(qconfig)}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / QCONFIG_NAME).write_text(json.dumps(qconfig, indent=2))
        if hasattr(model, "config"):
            model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder / WEIGHTS_NAME


def _rebuild(spec: dict, tensors: dict, device) -> QuantizedModule:
    """The module a saved ``spec`` and its tensors describe, by its registered kind (``registry.module_format``)."""
    return module_format(spec["kind"]).rebuild(tensors, spec, device)


def _tied_head(src: QuantizedModule, spec: dict) -> QuantizedModule:
    """The head ``spec`` describes, over the tensors of the embedding ``src`` it was saved tied to."""
    tied = module_format(spec["kind"]).tied
    if tied is None:
        raise ValueError(f"a {spec['kind']} module is saved tied to {src.kind}; allowed: a kind that can be tied")
    return tied(src, spec)


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make the tensor at dotted name ``alias`` the very tensor at ``source`` (parameter or buffer)."""
    src_owner, _, src_attr = source.rpartition(".")
    tensor = getattr(model.get_submodule(src_owner), src_attr)
    owner_name, _, attr = alias.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    else:
        owner._buffers[attr] = tensor


def load_quantized(folder: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by ``save_quantized``: float parts, then the packed modules, re-packed for ``device``."""
    folder = Path(folder)
    device = torch.device(device) if device is not None else default_device()
    check_model_folder(folder)  # checksums, headers, config sizes: before anything is allocated
    try:
        return _load_quantized(folder, device)
    except (KeyError, AttributeError, TypeError, IndexError, json.JSONDecodeError) as err:  # a bad module spec
        raise ValueError(f"quantized model folder {str(folder)!r} is damaged or from another version: "
                         f"{type(err).__name__} {' '.join(str(err).split())[:160]}") from None


def _load_quantized(folder: Path, device: torch.device) -> nn.Module:
    if not (folder / QCONFIG_NAME).is_file():
        raise ValueError(f"quantized model folder {str(folder)!r} is incomplete: {QCONFIG_NAME} is missing")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
        if "distill_lab" not in meta:
            raise ValueError(f"{folder / WEIGHTS_NAME} was not written by save_quantized (no distill_lab metadata)")
        qconfig = json.loads(meta["distill_lab"])
        # clone: safetensors may hand back views at unaligned offsets of the file, and the int8
        # CPU kernel (aten._weight_int8pack_mm) crashes on an unaligned weight
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    modules = qconfig["modules"]
    built = {}
    for name, spec in modules.items():
        if "tied_to" in spec:
            continue
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        built[name] = _rebuild(spec, own, device)
        set_module(model, name, built[name])
    for name, spec in modules.items():
        if "tied_to" in spec:
            head = _tied_head(built[spec["tied_to"]], spec)
            if f"{name}.bias" in tensors:
                head.bias = tensors[f"{name}.bias"].float().to(device)
            set_module(model, name, head)
    float_state = {k: v for k, v in tensors.items()
                   if not any(k.startswith(n + ".") for n in modules)}
    missing, unexpected = model.load_state_dict(float_state, strict=False, assign=True)
    qnames = tuple(n + "." for n in modules)
    missing = [k for k in missing if not k.startswith(qnames)]
    for alias, source in qconfig.get("tied_float", {}).items():  # shared tensors, saved once: share them again
        if alias in missing and source in tensors:
            _tie(model, alias, source)
            missing.remove(alias)
    emb, head = embedding_and_head(model)
    if getattr(config, "tie_word_embeddings", False) and isinstance(emb, nn.Embedding) \
            and isinstance(head, nn.Linear):  # float tied weights were saved once
        head.weight = emb.weight
        missing = [k for k in missing if k != f"{module_name(model, head)}.weight"]
    if missing or unexpected:
        raise ValueError(f"quantized model folder {str(folder)!r} does not match its config: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    model.quantization_config = qconfig["config"]
    return model.to(device).eval()
