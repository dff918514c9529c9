"""What a saved model folder must hold before anything is built from it.

``check_model_folder`` reads only ``config.json``, the manifest and the safetensors headers (no
tensor data), so a folder whose config asks for 20,000 layers, or whose weight file is truncated,
is refused in milliseconds with a message naming the folder, before any model is allocated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from ._fs import DamagedFileError, verify_manifest, weight_files

__all__ = ["check_model_folder", "loading_problems", "read_config", "tensor_headers"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
_EMBED = ("embed_tokens.weight", "embed_tokens.weight_int8", "wte.weight", "embed_in.weight")
# an MLP's first projection, (intermediate, hidden) as saved: float, int8 codes or portable int4 packed rows
_MLP_UP = re.compile(r"\.(?:up_proj|gate_proj|fc1|dense_h_to_4h|intermediate\.dense)\.(?:weight|weight_int8|packed)$")
_INTERMEDIATE = ("ffn_dim", "n_inner")  # MLP widths configs name without the word "intermediate"


def read_config(folder: Path) -> dict:
    """``config.json`` of a model folder as a dict; DamagedFileError when missing or unreadable."""
    path = folder / "config.json"
    if not path.is_file():
        raise DamagedFileError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DamagedFileError(f"{path}: unreadable config ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path}: a config must be a JSON object")
    return data


def tensor_headers(folder: Path) -> tuple[dict, dict]:
    """``({tensor name: shape}, metadata)`` of the folder's safetensors files, read from their headers only."""
    shapes, meta = {}, {}
    files = weight_files(folder)
    if not files and any(folder.glob("*.bin")):
        return shapes, meta  # an older PyTorch checkpoint: transformers reads it (weights_only) and we check its keys
    if not files:
        raise DamagedFileError(f"model folder {str(folder)!r} holds no *.safetensors weight file")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta.update(f.metadata() or {})
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
            raise DamagedFileError(f"{path}: cannot be read as safetensors "
                                   f"({' '.join(str(err).split())[:160]})") from None
    return shapes, meta


def _config_value(cfg: dict, *names):
    for name in names:
        v = cfg.get(name)
        if v is not None:
            return v
    text = cfg.get("text_config")
    if isinstance(text, dict):
        return _config_value(text, *names)
    return None


def check_model_folder(folder: str | Path) -> dict:
    """Refuse a folder whose files cannot make a complete model; return ``{"config", "shapes", "meta"}``.

    Checks, in order: the manifest's checksums, ``config.json``, the safetensors headers, and that
    the config's layer count, hidden size and vocabulary match the tensors present.
    """
    folder = Path(folder)
    verify_manifest(folder)
    cfg = read_config(folder)
    shapes, meta = tensor_headers(folder)
    layers = _config_value(cfg, "num_hidden_layers", "n_layer", "num_layers")
    found = {int(m.group(1)) for k in shapes for m in [_LAYER.search(k)] if m}
    if isinstance(layers, int) and found and found != set(range(layers)):
        extra = sorted(found - set(range(layers)))[:3]
        missing = sorted(set(range(layers)) - found)[:3]
        raise DamagedFileError(
            f"model folder {str(folder)!r}: config.json asks for {layers} layers but the weights hold "
            f"{len(found)} (missing layers {missing}{'...' if len(set(range(layers)) - found) > 3 else ''}"
            f"{f', unexpected layers {extra}' if extra else ''})")
    vocab = _config_value(cfg, "vocab_size")
    hidden = _config_value(cfg, "word_embed_proj_dim", "hidden_size", "n_embd", "d_model")  # OPT projects
    for key, shape in shapes.items():
        if key.endswith(_EMBED) and len(shape) == 2:
            if isinstance(vocab, int) and shape[0] != vocab:
                raise DamagedFileError(f"model folder {str(folder)!r}: config.json says vocab_size={vocab} but "
                                       f"{key} has {shape[0]} rows")
            if isinstance(hidden, int) and shape[1] != hidden:
                raise DamagedFileError(f"model folder {str(folder)!r}: config.json says hidden_size={hidden} "
                                       f"but {key} has {shape[1]} columns")
            break
    _check_intermediate(folder, cfg, shapes)
    return {"config": cfg, "shapes": shapes, "meta": meta}


def _check_intermediate(folder: Path, cfg: dict, shapes: dict) -> None:
    """Refuse a config whose MLP width matches none of the MLP weights (``intermediate_size: 10**9`` would
    make transformers allocate hundreds of GB before its own, unclear, mismatch error)."""
    scopes = [cfg] + ([cfg["text_config"]] if isinstance(cfg.get("text_config"), dict) else [])
    sizes = {n: v for scope in scopes for n, v in scope.items()
             if ("intermediate" in n or n in _INTERMEDIATE) and isinstance(v, int) and not isinstance(v, bool)}
    rows = {key: shape[0] for key, shape in shapes.items() if len(shape) == 2 and _MLP_UP.search(key)}
    if sizes and rows and not set(rows.values()) & set(sizes.values()):
        key, found = next(iter(rows.items()))
        said = ", ".join(f"{n}={v}" for n, v in sizes.items())
        raise DamagedFileError(f"model folder {str(folder)!r}: config.json says {said} but {key} has {found} rows "
                               f"(allowed: the MLP width of the weights)")


def loading_problems(model, missing, unexpected, mismatched=()) -> list[str]:
    """Turn a load's missing / unexpected keys into messages (a tied head is not missing)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    head = None
    if tied and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        for name, module in model.named_modules():
            if module is model.get_output_embeddings():
                head = f"{name}.weight"
    missing = [k for k in missing if k != head]
    out = []
    if missing:
        out.append(f"missing tensors {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        out.append(f"unexpected tensors {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''} "
                   f"({len(unexpected)})")
    if mismatched:
        out.append(f"tensors of the wrong shape {[m[0] if isinstance(m, tuple) else m for m in mismatched][:5]}")
    return out
