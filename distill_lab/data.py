"""Offline corpora, deterministic splits, token windows and calibration batches.

* ``pydoc``: the Python documentation topics that ship with every CPython
  (``pydoc_data.topics``), about 465k characters / 113k SmolLM2 tokens. In-domain text.
* ``stdlib-code``: Python source files from the standard library. Out-of-domain for the
  lessons ("evaluate on domain-specific data, not only general metrics").
* Any other name is looked up with the ``datasets`` package when online (e.g.
  ``"wikitext-2"``), through the same ``load_corpus(name, split)``.

Splits are deterministic: each document (a pydoc topic or a source file) goes to train,
validation or test by the CRC32 of its name, so they never depend on dict order or a seed.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

__all__ = ["calibration_batches", "corpus_documents", "corpus_windows", "HELD_OUT_PROMPTS", "HUB_ALIASES",
           "load_corpus", "OFFLINE_CORPORA", "sample_batch", "SPLITS", "STDLIB_PACKAGES", "token_windows", "tokenize",
           "VALIDATION_PROMPTS"]

SPLITS = ("train", "validation", "test")
OFFLINE_CORPORA = ("pydoc", "stdlib-code")
# Standard-library packages whose .py files form the ``stdlib-code`` corpus.
STDLIB_PACKAGES = ("json", "email", "logging", "collections", "concurrent", "importlib",
                   "urllib", "http", "xml", "wsgiref", "sqlite3", "tomllib", "zoneinfo")
HUB_ALIASES = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
               "wikitext-103": ("wikitext", "wikitext-103-raw-v1")}

# Prompts for the greedy-continuation (repetition) check, split like the windows: a recipe is chosen on
# VALIDATION_PROMPTS (benchmarks/distill_levers.py) and reported on HELD_OUT_PROMPTS (lesson 01), which no
# choice has seen. The first two validation prompts are the ones lesson 01's recipe was first picked on; the
# other ten were added before any of them was run. The held-out six were written once, before any model
# continued them; change them and every held-out verdict must be measured again.
VALIDATION_PROMPTS = ("The try statement specifies", "A list comprehension consists of",
                      "The with statement is used to", "A generator function is", "The import statement",
                      "A dictionary maps", "The for statement is used to", "An exception is raised when",
                      "A class definition defines", "A lambda expression", "The global statement", "A tuple is")
HELD_OUT_PROMPTS = ("The while statement is used to", "A decorator is", "The return statement",
                    "A module is", "The assert statement", "A set is")


def _split_of(key: str) -> str:
    """Assign a document to a split by the CRC32 of its name (80 / 10 / 10)."""
    bucket = zlib.crc32(key.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def corpus_documents(name: str) -> dict[str, str]:
    """Return the named offline corpus as ``{document name: text}``, sorted by name."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return {k: topics[k] for k in sorted(topics)}
    if name == "stdlib-code":
        lib = Path(sysconfig.get_paths()["stdlib"])
        docs = {}
        for package in STDLIB_PACKAGES:
            for path in sorted((lib / package).rglob("*.py")):
                rel = path.relative_to(lib).as_posix()
                docs[rel] = path.read_text(encoding="utf-8", errors="replace")
        return dict(sorted(docs.items()))
    raise ValueError(f"unknown offline corpus {name!r}; allowed: {', '.join(OFFLINE_CORPORA)}")


def load_corpus(name: str = "pydoc", split: str = "train") -> str:
    """Return one deterministic split of a corpus as a single string (documents joined by blank lines)."""
    _check_split(split)
    if name in OFFLINE_CORPORA:
        docs = corpus_documents(name)
        return "\n\n".join(text for key, text in docs.items() if _split_of(key) == split)
    return _load_hub_corpus(name, split)


def _load_hub_corpus(name: str, split: str) -> str:
    """Load a ``datasets`` corpus (online only); fail with a clear message otherwise."""
    allowed = f"{', '.join(OFFLINE_CORPORA)} offline, or a datasets name such as 'wikitext-2' online"
    if "/" not in name and name not in HUB_ALIASES:
        raise ValueError(f"unknown corpus {name!r}; allowed: {allowed}")
    try:
        import datasets  # optional: pip install 'distill_lab[online]'
    except ImportError:
        raise ValueError(f"corpus {name!r} needs the `datasets` package and a network; "
                         f"allowed offline: {', '.join(OFFLINE_CORPORA)}") from None
    path, config = HUB_ALIASES.get(name, (name, None))
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network or hub errors: one clear line, not a retry trace
        raise OSError(f"could not load corpus {name!r} from the hub ({type(err).__name__}); "
                      f"offline corpora: {', '.join(OFFLINE_CORPORA)}") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n".join(ds[column])


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Tokenize a whole corpus into one long 1-D tensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # (N,)


def token_windows(ids: torch.Tensor, window: int, stride: int | None = None,
                  max_windows: int | None = None, max_context: int | None = None) -> torch.Tensor:
    """Cut a 1-D token tensor into windows of ``window`` tokens every ``stride`` tokens, shape (N, window)."""
    if max_context is not None and window > max_context:
        raise ValueError(f"window={window} is longer than the model's context "
                         f"({max_context} tokens); allowed: 2 <= window <= {max_context}")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window={window!r}; allowed: an int >= 2")
    stride = window if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride={stride!r}; allowed: 1 <= stride <= window ({window})")
    if ids.dim() != 1 or ids.numel() < window:
        raise ValueError(f"need a 1-D tensor of at least window={window} tokens, got shape {tuple(ids.shape)}")
    windows = ids.unfold(0, window, stride)  # (N, window), a view
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.contiguous()


def corpus_windows(name: str, split: str, tokenizer, window: int, stride: int | None = None,
                   max_windows: int | None = None, max_context: int | None = None) -> torch.Tensor:
    """Load a corpus split, tokenize it and cut it into windows, shape (N, window)."""
    return token_windows(tokenize(load_corpus(name, split), tokenizer), window, stride,
                         max_windows, max_context)


def calibration_batches(windows: torch.Tensor, n_windows: int, batch_size: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """Draw ``n_windows`` windows at random (seeded) and group them into batches of (batch_size, T)."""
    if not 1 <= n_windows <= len(windows):
        raise ValueError(f"n_windows={n_windows}; allowed: 1 to {len(windows)} (windows available)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; allowed: >= 1")
    g = torch.Generator().manual_seed(seed)
    picked = windows[torch.randperm(len(windows), generator=g)[:n_windows]]
    return list(picked.split(batch_size))


def sample_batch(windows: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``batch_size`` windows with replacement from (N, T) ``windows`` -> (batch_size, T); seeded by ``generator``."""
    return windows[torch.randint(0, len(windows), (batch_size,), generator=generator)]
