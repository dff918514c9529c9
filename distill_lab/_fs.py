"""Small filesystem helpers shared by the modules that write models atomically.

Every temporary folder distill_lab creates is named ``.tmp-dl-<pid>-h<host>-<random>``, so a later run
can recognise (and only remove) the leftovers of an interrupted one: ``clean_stale_tmp``. Saved
folders carry a manifest (``distill_lab_manifest.json``, one SHA-256 per weight file) that
``verify_manifest`` checks on load, and ``folder_lock`` serialises two writers of one folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_file", "atomic_folder", "atomic_write_text", "check_replaceable", "clean_stale_tmp",
           "DamagedFileError", "folder_lock", "HOST_TAG", "LockedError", "make_tmp_dir", "make_tmp_file",
           "MANIFEST_FORMAT", "MANIFEST_NAME", "move", "name_some", "read_manifest", "replace_dir", "sha256_file",
           "share_permissions", "TMP_PREFIX", "unlisted_entries", "verify_manifest", "weight_files",
           "write_manifest"]

TMP_PREFIX = ".tmp-dl-"  # distill_lab's own temporary entries: .tmp-dl-<pid>-h<host>-<random>
HOST_TAG = "h" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # this machine, in tmp names
MANIFEST_NAME = "distill_lab_manifest.json"  # {"format": ..., "kind": ..., "files": {name: sha256}}
MANIFEST_FORMAT = "distill_lab.manifest/1"


class DamagedFileError(ValueError):
    """A saved model, step or cache file is incomplete, truncated or fails its checksum."""


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


def _tmp_prefix() -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{HOST_TAG}-"


def make_tmp_dir(parent: str | Path) -> Path:
    """Create a private temporary folder in ``parent`` named ``.tmp-dl-<pid>-...`` (see ``clean_stale_tmp``)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=parent))


def make_tmp_file(parent: str | Path, suffix: str = "") -> Path:
    """Create an empty temporary file in ``parent`` named ``.tmp-dl-<pid>-...`` and return its path."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=suffix, dir=parent)
    os.close(fd)
    return Path(name)



@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "", mode: int | None = None):
    """Write ``path`` all at once: yield a temporary path beside it, then rename it into place.

    The one atomic-write helper of the package. The temporary file is ``.tmp-dl-<pid>-...`` in the same
    folder (a rename is atomic only within one filesystem); on an exception it is removed and ``path``
    is untouched. The file gets the modes a plain write would have had (or ``mode`` when given)::

        with atomic_file(out / "result.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = make_tmp_file(path.parent, suffix=suffix or path.suffix)
    try:
        yield tmp
        if mode is None:
            share_permissions(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_file``) and return the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(parent: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove distill_lab's leftover ``.tmp-dl-<pid>-*`` entries in ``parent`` whose process is gone; return them.

    Only names with distill_lab's own prefix are touched, never while the process that made them
    is alive. An entry made on this machine (its host tag) goes as soon as its process is gone; one
    from another machine sharing the folder (or from an older distill_lab, without a host tag) only
    when older than ``min_age_s``, since its pid means nothing here.
    """
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for entry in parent.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        parts = entry.name[len(TMP_PREFIX):].split("-")
        if not parts[0].isdigit():
            continue
        pid, here = int(parts[0]), len(parts) > 2 and parts[1] == HOST_TAG
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if pid == os.getpid() or _pid_alive(pid) or (not here and age < min_age_s):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


_RENAME_EXCHANGE = 2


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Make folder ``src`` appear as ``dst`` in one step; an older ``dst`` is swapped out, then removed.

    On Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, so a reader of ``dst``
    sees either the old or the new folder, never a half-deleted one. Elsewhere the old folder is
    first renamed aside (``dst`` is briefly missing, never partial).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to ask (Windows): the two-rename fallback below
        fn = None
    if fn is not None:
        at_fdcwd = -100
        rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_EXCHANGE)
        if rc == 0:  # src now holds the old folder
            shutil.rmtree(src, ignore_errors=True)
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(dst))
    aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=dst.parent))
    os.replace(dst, aside / "old")
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def move(src: str | Path, dst: str | Path) -> Path:
    """Rename ``src`` (file or folder) to ``dst`` on the same filesystem; never replaces an existing ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists; refusing to replace it with {src}")
    os.replace(src, dst)
    return dst


def check_replaceable(folder: str | Path) -> None:
    """Raise ``FileExistsError`` unless ``folder`` is missing, empty, or exactly what distill_lab wrote there.

    A folder with our manifest is replaceable only when nothing was added or changed since (``unlisted_entries``):
    the error names the extra files.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise FileExistsError(f"{folder} exists and is not a folder; refusing to replace it (choose another path)")
    if not any(folder.iterdir()):
        return
    try:
        manifest = read_manifest(folder)
    except DamagedFileError:
        manifest = None
    if manifest is None:
        raise FileExistsError(f"{folder} holds files distill_lab did not write (no {MANIFEST_NAME}); refusing to "
                              "replace them: choose a new or empty folder, or remove it yourself")
    extra = unlisted_entries(folder, manifest)
    if extra:
        raise FileExistsError(f"{folder} holds files distill_lab did not write: {name_some(extra)}; refusing to "
                              "replace it: move them out, or choose a new or empty folder")


# names a folder saved before manifests listed every file may hold besides its weight files
_LEGACY_NAMES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json",
                           "merges.txt", "tokenizer.model", "quantization_config.json", "compression.json",
                           "step.json", "model.safetensors.index.json"})


def name_some(names: list[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``: a list of names short enough for one line."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def unlisted_entries(folder: str | Path, manifest: dict | None = None) -> list[str]:
    """What in ``folder`` its manifest does not account for: added files and folders, and changed small files.

    ``folder/plots/`` for a folder no listed file lies in, ``notes.md`` for an added file,
    ``config.json (changed)`` for a listed non-weight file whose SHA-256 differs. Weight files are not
    hashed again here (``verify_manifest`` does that on load). A manifest without ``contents`` (older
    distill_lab) accounts for its weight files and the names a saved model folder holds.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else (read_manifest(folder) or {})
    contents = manifest.get("contents")
    weights = manifest.get("files", {})
    listed = set(contents) if isinstance(contents, dict) else set(weights) | _LEGACY_NAMES
    parents = {p.as_posix() for name in listed for p in Path(name).parents}  # folders that hold a listed file
    extra = []

    def walk(here: Path) -> None:
        for entry in sorted(here.iterdir()):
            rel = entry.relative_to(folder).as_posix()
            if rel == MANIFEST_NAME or entry.name.startswith(TMP_PREFIX):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if rel in parents:
                    walk(entry)
                else:
                    extra.append(rel + "/")
            elif rel not in listed or entry.is_symlink() or not entry.is_file():
                extra.append(rel)
            elif isinstance(contents, dict) and rel not in weights and sha256_file(entry) != contents[rel]:
                extra.append(f"{rel} (changed)")

    walk(folder)
    return extra


@contextlib.contextmanager
def atomic_folder(folder: str | Path, kind: str = "model", extra: dict | None = None, *, manifest: bool = True,
                  ours_only: bool = True):
    """Yield a temporary folder beside ``folder``; when the block succeeds it becomes ``folder`` in one rename.

    The package's one way to publish a folder. A half-written folder is never visible under the final
    name, the result gets ``share_permissions`` and (unless ``manifest=False``: the block wrote its own)
    a manifest of its files (``write_manifest(kind, extra)``). With ``ours_only`` an existing ``folder``
    is replaced only when it is empty or distill_lab wrote it and nothing was added (``check_replaceable``),
    checked before the block and again before the rename, so a user's files are never removed; without it
    (a step or cache folder the package owns, possibly damaged) it is replaced whatever it holds.
    """
    folder = Path(folder)
    if ours_only:
        check_replaceable(folder)
    tmp = make_tmp_dir(folder.parent)
    try:
        yield tmp
        if manifest:
            write_manifest(tmp, kind=kind, extra=extra)
        share_permissions(tmp)
        if ours_only:
            check_replaceable(folder)  # nothing appeared meanwhile
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder (``*.safetensors``), sorted."""
    return sorted(Path(folder).glob("*.safetensors"))


def write_manifest(folder: str | Path, kind: str = "model", extra: dict | None = None) -> Path:
    """Write ``distill_lab_manifest.json``: SHA-256 of each weight file (``files``) and of every file (``contents``).

    ``contents`` lists everything in the folder (sub-folders included) when the manifest is written, so a
    later run can tell whether anything was added or changed since (``unlisted_entries``).
    """
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in weight_files(folder)}
    contents = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and rel != MANIFEST_NAME:
            contents[rel] = files[rel] if rel in files else sha256_file(path)
    data = {"format": MANIFEST_FORMAT, "kind": kind, "files": files, "contents": contents, **(extra or {})}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, or None when it has none; a manifest that does not parse raises DamagedFileError."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DamagedFileError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        raise DamagedFileError(f"{path}: not a distill_lab manifest")
    return data


def verify_manifest(folder: str | Path) -> dict | None:
    """Check every weight file listed in the folder's manifest (present, same SHA-256); return the manifest.

    Raises ``DamagedFileError`` naming the folder and the file. A folder without a manifest (a plain
    Hugging Face folder) passes and returns None.
    """
    folder = Path(folder)
    data = read_manifest(folder)
    if data is None:
        return None
    for name, digest in data["files"].items():
        path = folder / name
        if not path.is_file():
            raise DamagedFileError(f"model folder {str(folder)!r} is incomplete: {name} is missing "
                                   f"(listed in {MANIFEST_NAME})")
        if sha256_file(path) != digest:
            raise DamagedFileError(f"model folder {str(folder)!r} is damaged: {name} fails its checksum "
                                   f"(truncated or changed after it was saved)")
    return data


class LockedError(RuntimeError):
    """Another process holds the lock of a folder distill_lab is writing."""


@contextlib.contextmanager
def folder_lock(lock_path: str | Path, what: str, wait: bool = False):
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` for the block; raise ``LockedError`` when busy (unless ``wait``)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise LockedError(f"{what} is being written by another distill-lab run ({holder}, lock file "
                              f"{lock_path}); wait for it to finish or choose another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()
