"""What the task YAML files call to read their JSONL (``custom_dataset: !function loader.load_docs``).

lm-eval reads ``dataset_path: json`` files relative to the working directory; this reads them relative to
this folder instead, so the tasks work from any directory, through ``distill_lab.task_accuracy`` or the
harness's own ``lm_eval --include_path``. It imports nothing from distill_lab (lm-eval loads it by path),
keeps the documents in memory (no ``datasets`` cache files) and never contacts a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_docs"]


def load_docs(data_files: dict[str, str], **_metadata):
    """``datasets.DatasetDict`` of ``{split: JSONL file name in this folder}`` (lm-eval's metadata ignored)."""
    import datasets  # lm-eval's own dependency; imported here so that importing distill_lab never needs it

    here = Path(__file__).resolve().parent
    splits = {}
    for split, name in data_files.items():
        with open(here / name, encoding="utf-8") as fh:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in fh if line.strip()])
    return datasets.DatasetDict(splits)
