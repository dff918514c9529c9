"""Saving and loading every model the package writes, below the techniques.

``save_model`` writes a Hugging Face folder (safetensors + config + tokenizer) or, for a quantized model,
the packed format of ``quantization.serialization``; ``load_saved`` reads either back and checks the
folder's manifest first. ``models.load_model`` uses it for every folder, so loading never imports a technique.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ._folder import check_model_folder, loading_problems
from ._fs import DamagedFileError, weight_files, write_manifest
from ._hf import quiet_transformers
from .profiles import default_device
from .quantization.modules import QuantizedModule
from .quantization.serialization import load_quantized, save_quantized

__all__ = ["load_saved", "save_model", "weights_bytes"]


# ----------------------------------------------------------------------------------------------
# Saving, loading and measuring one model
# ----------------------------------------------------------------------------------------------


def _has_quantized_modules(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedModule) for m in model.modules())


def _write_weights(model: nn.Module, folder: Path) -> None:
    """The weight files and config of ``model`` in ``folder``: packed for a quantized model, else ``save_pretrained``."""
    with quiet_transformers():
        if _has_quantized_modules(model):
            save_quantized(model, folder)
        else:
            model.save_pretrained(folder)


def save_model(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Save a (possibly quantized) model and its tokenizer as a safetensors folder that ``load_model`` reloads."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_weights(model, folder)
    if tokenizer is not None:
        with quiet_transformers():
            tokenizer.save_pretrained(folder)
    write_manifest(folder)  # checksums of the weight files, checked by every load
    return folder


def load_saved(folder: str | Path, device=None, dtype: torch.dtype | None = torch.float32) -> tuple[nn.Module, object]:
    """Reload a model folder: ``(model, tokenizer or None)``; the package's one loader of a folder.

    Reads what ``save_model`` writes (the packed format of a quantized model, or a Hugging Face
    folder) and any plain Hugging Face folder, in ``dtype`` (a packed model keeps its own dtypes).
    The folder's sizes and manifest checksums are checked before anything is allocated; a folder
    that does not match its config.json, or a distill_lab checkpoint of another kind (e.g. sparse),
    raises ``DamagedFileError`` naming it. Never runs remote code.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    meta = check_model_folder(folder)["meta"]  # sizes and checksums, before anything is allocated
    with quiet_transformers():
        if (folder / "quantization_config.json").is_file() or "distill_lab" in meta:
            model = load_quantized(folder, device=device)  # checks the folder itself
        elif meta.get("format", "").startswith("distill_lab"):
            raise DamagedFileError(f"model folder {str(folder)!r} holds a distill_lab {meta['format']} checkpoint; "
                                   "load it with the function that wrote it (e.g. load_sparse)")
        else:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                               output_loading_info=True)
            problems = loading_problems(model, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                                        info.get("mismatched_keys", ()))
            if problems:
                raise DamagedFileError(f"model folder {str(folder)!r} does not match its config.json: "
                                       + "; ".join(problems))
        tokenizer = None
        if (folder / "tokenizer_config.json").is_file():  # tiny test models are saved without one
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def weights_bytes(folder_or_model: str | Path | nn.Module) -> int:
    """Bytes of the weight files (``*.safetensors``) of a saved model folder, or of a model as ``save_model`` saves it.

    The package's one count of bytes on disk (bytes in memory: ``tensors.memory_bytes``). A model is
    written to a temporary folder and measured: the packed format for a quantized model, else the
    ``save_pretrained`` safetensors (what "stored dense" costs).
    """
    if isinstance(folder_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            _write_weights(folder_or_model, Path(tmp))
            return weights_bytes(tmp)
    return sum(p.stat().st_size for p in weight_files(folder_or_model))
