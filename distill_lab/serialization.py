"""Saving and loading every model the package writes, below the techniques.

``save_model`` writes a Hugging Face folder (safetensors + config + tokenizer) or, for a quantized model,
the packed format of ``quantization.serialization``; ``load_saved`` reads either back and checks the
folder's manifest first. ``models.load_model`` uses it, so loading never imports a technique.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._folder import check_model_folder, loading_problems
from ._fs import DamagedFileError, write_manifest
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


def save_model(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Save a (possibly quantized) model and its tokenizer as a safetensors folder that ``load_model`` reloads."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        if _has_quantized_modules(model):

            save_quantized(model, folder)
        else:
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    write_manifest(folder)  # checksums of the weight files, checked by every load
    return folder


def load_saved(folder: str | Path, device=None) -> tuple[nn.Module, object]:
    """Reload a folder written by ``save_model``: ``(model, tokenizer or None)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer



    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    with quiet_transformers():
        if (folder / "quantization_config.json").is_file() or "distill_lab" in check_model_folder(folder)["meta"]:

            model = load_quantized(folder, device=device)  # checks the folder itself
        else:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
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


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
