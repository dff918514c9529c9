"""Publish a recipe's last step as the ``--out`` folder of ``distill-lab compress``, in one rename.

An ``--out`` folder is replaced only when it is missing, empty, or an earlier export that nobody added to
(and then only with ``overwrite``): ``check_out`` says why not, before any work and again just before the
rename. The folder is written by ``_fs.atomic_folder``, with a manifest of kind ``EXPORT_KIND``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .._fs import DamagedFileError, atomic_folder, name_some, read_manifest, unlisted_entries

__all__ = ["EXPORT_KIND", "check_out", "out_state", "publish_export"]

EXPORT_KIND = "export"  # the manifest kind that marks a folder as an earlier `compress` export


def out_state(out: Path) -> tuple[str, list[str]]:
    """``(state, extra)``: state ``missing``, ``empty``, ``export`` (an earlier distill_lab export) or ``foreign``.

    An export counts as one only while it holds exactly what compress wrote (its manifest's contents);
    ``extra`` names what was added or changed since (then the state is ``foreign``).
    """
    if not out.exists() and not out.is_symlink():
        return "missing", []
    if not out.is_dir() or out.is_symlink():
        return "foreign", []
    if not any(out.iterdir()):
        return "empty", []
    try:
        manifest = read_manifest(out)
    except DamagedFileError:
        manifest = None
    if manifest is None or manifest.get("kind") != EXPORT_KIND:
        return "foreign", []
    extra = unlisted_entries(out, manifest)
    return ("foreign" if extra else EXPORT_KIND), extra


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds files distill_lab did not export (or an export, without ``--overwrite``).

    The one rule of ``compress --out`` and ``export --format compressed-tensors --out``.
    """
    state, extra = out_state(out)
    if state == "foreign" and extra:
        raise FileExistsError(f"--out {out} holds an earlier export plus files distill-lab did not write: "
                              f"{name_some(extra)}; refusing to replace it (move them out, or choose a new folder)")
    if state == "foreign":
        what = "is not a folder" if not out.is_dir() else \
            "is not empty and was not written by distill-lab compress or export"
        raise FileExistsError(f"--out {out} {what}; refusing to replace it (choose a new or empty folder)")
    if state == EXPORT_KIND and not overwrite:
        raise FileExistsError(f"--out {out} holds an earlier distill-lab export; pass --overwrite to replace it")


def publish_export(step_folder: str | Path, out: str | Path, recipe_name: str, overwrite: bool) -> Path:
    """Copy a finished step folder to ``out`` (its ``step.json`` becomes ``compression.json``) in one rename."""
    out = Path(out)
    check_out(out, overwrite)
    with atomic_folder(out, kind=EXPORT_KIND, extra={"recipe": recipe_name}, ours_only=False) as tmp:
        shutil.copytree(step_folder, tmp, dirs_exist_ok=True)
        (tmp / "step.json").rename(tmp / "compression.json")
        check_out(out, overwrite)  # again: nothing appeared meanwhile
    return out
