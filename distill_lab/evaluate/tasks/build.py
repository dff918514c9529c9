"""Build the offline tasks' documents (JSONL) deterministically from text every CPython ships.

``python -m distill_lab.evaluate.tasks.build`` writes ``pydoc_mc.jsonl``, ``pydoc_cloze.jsonl`` and
``source.json`` (the Python that built them) next to the task YAML files; ``--check`` only compares a
fresh build with the files there (exit 1 on a difference). No global seed, order or clock is involved:
every draw is a ``random.Random`` seeded with the CRC32 of a name and every order is by name or by its
CRC32, so two builds on one Python give the same bytes. Another Python version has other
docstrings and documentation, hence other documents: the committed files are the task, and the test
that compares them with a fresh build runs on the Python recorded in ``source.json``.

* ``pydoc_mc``: the first sentences of the docstring of a public function or class of one of
  ``MC_MODULES``, with the four candidate names masked as ``___``; the choices are the right name and
  three others from the same module (of the same kind, function or class, where there are three).
  ``MC_MODULES`` shares no module with the ``stdlib-code`` corpus (``data.STDLIB_PACKAGES``) and the
  pydoc corpus documents the language, not these modules, so no document is text a course split holds.
* ``pydoc_cloze``: a word that ends a sentence or clause of the pydoc corpus's **validation** split (never
  the test windows perplexity is reported on, nor the train text students are distilled on), after the
  same paragraph's text before it (up to ``CLOZE_CONTEXT_CHARS`` characters).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
import zlib
from pathlib import Path

from ...data import STDLIB_PACKAGES, load_corpus
from .catalog import OFFLINE_TASKS, TASKS_DIR

__all__ = ["build_cloze_docs", "build_files", "build_mc_docs", "CLOZE_CONTEXT_CHARS", "CLOZE_DOCS", "main",
           "MASK", "MC_DOC_CHARS", "MC_DOCS", "MC_MODULES", "MC_PER_MODULE", "write_files"]

# Standard-library modules present in every CPython >= 3.10 on every platform (no os, sys, time: their
# names and docstrings differ by platform; no hashlib: it depends on the OpenSSL build).
MC_MODULES = ("argparse", "base64", "bisect", "calendar", "cmath", "codecs", "configparser", "contextlib",
              "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "enum", "fnmatch", "functools",
              "gzip", "heapq", "inspect", "io", "ipaddress", "itertools", "math", "mimetypes", "operator",
              "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex", "shutil",
              "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
              "traceback", "types", "typing", "unicodedata", "uuid", "warnings", "weakref", "zipfile", "zlib")
MC_PER_MODULE = 8  # at most this many documents per module, so that no module dominates
MC_DOCS = 300
MC_DOC_CHARS = 220  # first sentences of the docstring up to this length
CLOZE_DOCS = 300
CLOZE_CONTEXT_CHARS = 280
MASK = "___"
_SIGNATURE = re.compile(r"^[\w.]+\(")  # a C docstring's first line, 'name(a, b) -> c': no prose
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*])")


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def _first_sentences(doc: str, limit: int) -> str | None:
    """The docstring's first sentences up to ``limit`` characters (whitespace collapsed), or None."""
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or lines[0].strip() == "--" or _SIGNATURE.match(lines[0].strip())):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line.strip():
            break
        paragraph.append(line.strip())
    text = " ".join(" ".join(paragraph).split())
    if not text or any(code in text for code in (">>>", "<==>", "-->")):
        return None
    out = ""
    for sentence in _SENTENCE.split(text):
        if out and len(out) + 1 + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out if len(out) <= limit + 40 else None


def _public(module_name: str) -> list[tuple[str, str, object]]:
    """(name, kind, object) of the functions and classes ``module_name`` defines (its C accelerator too)."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or dir(module)
    out = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module_name, f"_{module_name}"):
            continue  # re-exported from elsewhere (typing's collections.abc aliases, ...)
        out.append((name, "class" if inspect.isclass(obj) else "function", obj))
    return out


def _own_doc(obj) -> str | None:
    """The docstring ``obj`` defines itself (a class inherits none here)."""
    return vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)


def _mask(text: str, module: str, names: list[str]) -> str:
    """``text`` with every candidate name (bare or ``module.name``, any case) replaced by ``MASK``."""
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<!\w)(?:{re.escape(module)}\.)?{re.escape(name)}(?!\w)", MASK, text,
                      flags=re.IGNORECASE)
    return text


def build_mc_docs(modules=MC_MODULES, per_module: int = MC_PER_MODULE, n_docs: int = MC_DOCS) -> list[dict]:
    """The ``pydoc_mc`` documents: ``{id, module, kind, docstring, choices, gold}``."""
    overlap = sorted(set(modules) & set(STDLIB_PACKAGES))
    if overlap:
        raise ValueError(f"modules {overlap} are in the stdlib-code corpus; allowed: modules outside "
                         f"{', '.join(STDLIB_PACKAGES)}")
    docs = []
    for module in sorted(modules):
        public = _public(module)
        texts = {}
        for name, kind, obj in public:
            doc = _own_doc(obj)
            text = _first_sentences(doc, MC_DOC_CHARS) if isinstance(doc, str) else None
            if text:
                texts[name] = (kind, text)
        seen = [t for _, t in texts.values()]
        unique = {n: kt for n, kt in texts.items() if seen.count(kt[1]) == 1}  # aliases share a docstring
        picked = []
        for name in sorted(unique, key=lambda n: _key(f"{module}.{n}")):
            kind, text = unique[name]
            same_kind = sorted(n for n, k, _ in public if k == kind and n != name)
            pool = same_kind if len(same_kind) >= 3 else sorted(n for n, _, _ in public if n != name)
            if len(pool) < 3:
                continue
            rng = random.Random(_key(f"{module}.{name}"))
            choices = rng.sample(pool, 3)
            gold = rng.randrange(4)
            choices.insert(gold, name)
            masked = _mask(text, module, choices)
            if len(re.findall(r"[A-Za-z]{2,}", masked)) < 4:
                continue
            picked.append({"id": f"{module}.{name}", "module": module, "kind": kind, "docstring": masked,
                           "choices": choices, "gold": gold})
            if len(picked) == per_module:
                break
        docs += picked
    docs.sort(key=lambda d: _key(d["id"]))  # a mixed order: any prefix (``limit``) spans many modules
    return docs[:n_docs]


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (no indented code or grammar, no headings), whitespace collapsed."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or any(line.startswith(" ") or set(line.strip()) <= set("*=-") for line in lines):
            continue
        out.append(" ".join(block.split()))
    return out


def build_cloze_docs(n_docs: int = CLOZE_DOCS, context_chars: int = CLOZE_CONTEXT_CHARS,
                     split: str = "validation") -> list[dict]:
    """The ``pydoc_cloze`` documents: ``{id, context, target}``.

    A target is a word of 3+ lowercase letters that ends a sentence or a clause (a punctuation mark follows
    it) after at least 5 words of its sentence; the context is the sentence up to it, after as many of the
    paragraph's earlier sentences as fit in ``context_chars``.
    """
    docs = []
    for p, paragraph in enumerate(_prose_paragraphs(load_corpus("pydoc", split))):
        sentences = _SENTENCE.split(paragraph)
        for s, sentence in enumerate(sentences):
            for match in re.finditer(r"\s([a-z]{3,})(?=[,;:.!?](\s|$))", sentence):
                context = sentence[:match.start(1)].rstrip()
                if len(context.split()) < 5:
                    continue
                for earlier in reversed(sentences[:s]):
                    if len(earlier) + 1 + len(context) > context_chars:
                        break
                    context = f"{earlier} {context}"
                docs.append({"id": f"{split}-{p}-{s}-{match.start(1)}", "context": context,
                             "target": match.group(1)})
    docs.sort(key=lambda d: _key(d["id"]))
    return docs[:n_docs]


def _jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def build_files() -> dict[str, str]:
    """``{file name: text}`` of a fresh build: one JSONL per offline task and ``source.json``."""
    files = {"pydoc_cloze.jsonl": _jsonl(build_cloze_docs()), "pydoc_mc.jsonl": _jsonl(build_mc_docs())}
    assert sorted(f.removesuffix(".jsonl") for f in files) == sorted(OFFLINE_TASKS)
    source = {"python": ".".join(map(str, sys.version_info[:3])),
              "docs": {name: text.count("\n") for name, text in files.items()},
              "built_by": "python -m distill_lab.evaluate.tasks.build"}
    files["source.json"] = json.dumps(source, indent=1, sort_keys=True) + "\n"
    return files


def write_files(folder: Path = TASKS_DIR) -> list[Path]:
    """Write a fresh build into ``folder``; returns the paths written."""
    paths = []
    for name, text in build_files().items():
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``build`` writes the files; ``build --check`` reports which committed files differ (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m distill_lab.evaluate.tasks.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the committed files")
    args = parser.parse_args(argv)
    if not args.check:
        for path in write_files():
            print(f"wrote {path}")
        return 0
    stale = [name for name, text in build_files().items()
             if not (TASKS_DIR / name).is_file() or (TASKS_DIR / name).read_text(encoding="utf-8") != text]
    print("stale: " + ", ".join(stale) if stale else "up to date")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
