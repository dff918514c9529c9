"""Where the offline tasks live and what they are called; ``task_docs`` reads one task's documents."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OFFLINE_TASKS", "TASKS_DIR", "task_docs"]

TASKS_DIR = Path(__file__).resolve().parent
OFFLINE_TASKS = ("pydoc_cloze", "pydoc_mc")


def task_docs(name: str) -> list[dict]:
    """The documents of offline task ``name`` as dicts, in the order the harness reads them."""
    if name not in OFFLINE_TASKS:
        raise ValueError(f"unknown offline task {name!r}; allowed: {', '.join(OFFLINE_TASKS)}")
    with open(TASKS_DIR / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
