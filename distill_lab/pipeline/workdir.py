"""The work folder of ``run_recipe``: only what it wrote there, so nothing else in it is ever replaced or removed.

A marker file (``WORK_MARKER``) records the SHA-256 of the files the runner writes at the folder's top;
``check_work_dir`` refuses a folder that holds anything else before a byte is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .._fs import TMP_PREFIX, atomic_write_text, name_some, sha256_file

__all__ = ["STATE_FILE", "WORK_FILES", "WORK_MARKER", "check_work_dir", "record_work"]

STATE_FILE = "step.json"  # a finished step's saved state, in its folder steps/NN_kind/
WORK_MARKER = "distill_lab_work.json"  # {"format": ..., "files": {name: sha256}} of the files written at its top
WORK_FORMAT = "distill_lab.work/1"
WORK_FILES = ("recipe.yaml", "teacher.json", "result.json")  # rewritten by every run
_RECORDED = ("recipe.yaml", "result.json")  # and recorded in the marker: changed since, they are the user's
# (teacher.json is a cache, like the teacher logits: a damaged one is measured again, see teacher_metrics)
_CACHE_FILE = re.compile(r"teacher_top\d+_[0-9a-f]{12}\.safetensors")  # cached teacher logits (steps._teacher_cache)
_STEP_DIR = re.compile(r"\d{2}_[A-Za-z0-9_]+")


def _work_marker(out_dir: Path) -> dict | None:
    try:
        data = json.loads((out_dir / WORK_MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == WORK_FORMAT and isinstance(data.get("files"), dict)
    return data if ok else None


def _foreign_work_entries(out_dir: Path) -> list[str]:
    """What in a work folder run_recipe did not write (or what changed since it wrote it)."""
    marker = _work_marker(out_dir)
    recorded = marker["files"] if marker else {}
    extra = []
    for entry in sorted(out_dir.iterdir()):
        name = entry.name
        if name.startswith(TMP_PREFIX) or (name == WORK_MARKER and marker):
            continue
        if entry.is_symlink():
            extra.append(name)
        elif name == "steps" and entry.is_dir():
            for step in sorted(entry.iterdir()):
                ours = step.is_dir() and not step.is_symlink() and _STEP_DIR.fullmatch(step.name) \
                    and (step / STATE_FILE).is_file()
                if not ours and not step.name.startswith(TMP_PREFIX):
                    extra.append(f"steps/{step.name}" + ("/" if step.is_dir() else ""))
        elif name in WORK_FILES and entry.is_file():
            if marker is not None and name in _RECORDED and name != marker.get("writing") \
                    and (name not in recorded or sha256_file(entry) != recorded[name]):
                extra.append(f"{name} (not as distill_lab wrote it)")
        elif not (_CACHE_FILE.fullmatch(name) and entry.is_file()):
            extra.append(name + ("/" if entry.is_dir() else ""))
    if marker is None and not extra and not (out_dir / "steps").is_dir():
        # an older run's folder always has steps/; without it these files may be anyone's (a recipe.yaml)
        extra = [p.name for p in sorted(out_dir.iterdir()) if not p.name.startswith(TMP_PREFIX)]
    return extra


def check_work_dir(out_dir: str | Path) -> None:
    """Raise ``FileExistsError`` unless ``out_dir`` is missing, empty, or holds only what run_recipe wrote there.

    run_recipe rewrites ``recipe.yaml``, ``teacher.json`` and ``result.json`` at the folder's top and
    removes stale ``steps/NN_kind`` folders, so a folder holding anything else (a user's recipe, notes,
    a ``steps/02_notes`` folder) is refused, naming those files, before anything is written.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"work folder {out_dir} exists and is not a folder; choose another --work")
    extra = _foreign_work_entries(out_dir)
    if extra:
        raise FileExistsError(f"work folder {out_dir} holds files distill_lab did not write: {name_some(extra)}; "
                              f"refusing to write into it (move them out, or choose a new or empty --work)")


def record_work(out_dir: Path, writing: str | None = None) -> None:
    """Note in the marker the SHA-256 of the files at the work folder's top, and the one about to be (re)written.

    ``writing`` names a file run_recipe writes next (atomically): if the run stops before the next call,
    that file is still recognised as ours, whichever version it holds.
    """
    files = {name: sha256_file(out_dir / name) for name in _RECORDED if (out_dir / name).is_file()}
    atomic_write_text(out_dir / WORK_MARKER, json.dumps({"format": WORK_FORMAT, "files": files, "writing": writing},
                                                        indent=2) + "\n")
