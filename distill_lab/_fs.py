"""Small filesystem helpers shared by the modules that write models atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def share_permissions(path: str | Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain write would have had under the umask.

    ``tempfile.mkdtemp`` / ``mkstemp`` (used for atomic writes) and safetensors create private
    0700 / 0600 entries; a saved model is meant to be shared, so restore 0777 / 0666 minus the umask.
    """
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temporary folder beside ``folder``; when the block succeeds it becomes ``folder`` in one rename.

    A half-written folder is never visible under the final name, and the result gets ``share_permissions``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        yield tmp
        share_permissions(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
