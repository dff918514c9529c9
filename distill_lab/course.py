"""Run the whole course headless: execute every notebook and collect their measured results.

``make run`` calls ``python -m distill_lab course --out reports``. Each notebook saves its key
numbers with ``distill_lab.record`` into ``$DISTILL_LAB_REPORT_DIR/results/``; this module sets
that variable, executes the notebooks with nbclient, and merges the records into
``results.json`` and ``results.md`` next to the executed copies.

A report is never lost. The new one is built in a temporary folder inside ``out`` and published only
when every notebook ran; an earlier report in ``out`` (``REPORT_ENTRIES``, listed with their digests in
``course_manifest.json``) is first moved whole into ``out/earlier-<its date>/``, and removed only with
``overwrite`` and only when it holds exactly what the manifest lists. A failed or interrupted run leaves
``out`` as it was and keeps what it executed in ``out/incomplete-<date>/``. Other entries of ``out``
(``comparison.*`` from ``report``, ``student/``, a user's files) are never touched.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tqdm.auto import tqdm

from ._fs import atomic_write_text, clean_stale_tmp, make_tmp_dir, move, name_some, sha256_file
from .evaluate import REPORT_ENV, environment_info
from .profiles import ENV_VAR, get_profile
from .timing import stopwatch

__all__ = ["check_course_out", "COURSE_FORMAT", "COURSE_MANIFEST", "execute_notebook", "find_notebooks",
           "INLINE_BACKEND", "kernel_env", "NOTEBOOK_DIR", "report_changes", "REPORT_ENTRIES", "results_markdown",
           "run_course", "strip_progress_bars"]

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# The kernel draws with ipykernel's inline backend even when the caller set MPLBACKEND=agg (CI
# does): only the inline backend turns a figure into an image/png output of its cell.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def kernel_env() -> dict:
    """Environment of the notebook kernel: this process's, with the inline matplotlib backend."""
    return {**os.environ, "MPLBACKEND": INLINE_BACKEND}


def find_notebooks(folder: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """Return the course notebooks (``NN_topic.ipynb``) in lesson order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


_PROGRESS_BAR = re.compile(r"^[^\n]*\d+%\|[^\n]*\|[^\n]*$")  # 'desc:  40%|####      | 2/5 [...]'


def strip_progress_bars(nb) -> int:
    """Drop tqdm progress-bar widget outputs from an executed notebook in place; return how many.

    Headless execution records each bar as a widget frozen at 0 % (its updates are comm messages
    that are not saved), which only adds noise. Other widgets (the lessons' knobs) are kept.
    """
    removed = 0
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = data.get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if "application/vnd.jupyter.widget-view+json" in data and _PROGRESS_BAR.match(text.strip()):
                removed += 1
                continue
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    return removed


def execute_notebook(path: Path, out_path: Path, timeout: int = 3600) -> float:
    """Execute one notebook (cwd = its folder) and write the executed copy; return seconds taken."""
    # imported here: nbformat's JSON-schema validator takes ~1 s to import, which every command line call
    # (``--help`` included) would pay, and only notebook execution needs it (tests/test_layering.py)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    elapsed = stopwatch()
    # store_widget_state: the knobs' models (and each Output's figure) go into metadata.widgets,
    # so a static view of the committed notebook shows the controls, not "interactive(children=...".
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        # the kernel's own stderr carries only its TCP warning and, when we stop it (Ctrl-C), a ZMQ traceback;
        # a cell's errors reach the executed copy through the kernel's messages
        client.execute(env=kernel_env(), stderr=subprocess.DEVNULL)
    except Exception:
        # nbclient catches SIGINT / SIGTERM itself: it stops the kernel, and the cell then fails with
        # whatever error the closed channel gives (AssertionError, RuntimeError). Say what happened.
        if getattr(client, "_async_cleanup_kernel_future", None) is not None:
            raise KeyboardInterrupt from None
        raise
    finally:
        strip_progress_bars(nb)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_path)
    return elapsed()


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def results_markdown(results: dict, profile: str, env: dict, timings: dict) -> str:
    """Render the merged results as a Markdown report."""
    lines = [f"# distill_lab results ({profile} profile)", "",
             f"Measured on {env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, "
             f"transformers {env['transformers']}, commit {env['git_commit']}, {env['time_utc']}.", "",
             "| notebook | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.0f} |" for name, sec in timings.items()]
    for name, record in results.items():
        lines += ["", f"## {name}", "", "| metric | value |", "|---|---|"]
        for key, value in _flatten(record["metrics"]).items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    return "\n".join(lines) + "\n"


REPORT_ENTRIES = ("results.md", "results.json", "results", "notebooks")  # what one course run writes into out
COURSE_MANIFEST = "course_manifest.json"  # {"format": ..., "contents": {path: sha256}} of the published report
COURSE_FORMAT = "distill_lab.course/1"


def _report_files(folder: Path) -> dict[str, Path]:
    """Every file (and symlink) of the report entries in ``folder``, by path relative to it."""
    found = {}
    for name in REPORT_ENTRIES:
        entry = folder / name
        paths = [entry] if entry.is_file() or entry.is_symlink() else sorted(entry.rglob("*")) if entry.is_dir() else []
        for path in paths:
            if path.is_file() or path.is_symlink():
                found[path.relative_to(folder).as_posix()] = path
    return found


def report_changes(out: str | Path) -> list[str] | None:
    """What in ``out``'s report its manifest does not list, or lists with another digest; None without a manifest."""
    out = Path(out)
    try:
        manifest = json.loads((out / COURSE_MANIFEST).read_text())
        listed = manifest["contents"] if manifest.get("format") == COURSE_FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        listed = None
    if not isinstance(listed, dict):
        return None
    changes = []
    for rel, path in _report_files(out).items():
        if rel not in listed or path.is_symlink():
            changes.append(rel)
        elif sha256_file(path) != listed[rel]:
            changes.append(f"{rel} (changed)")
    return changes


def _earlier_entries(out: Path) -> list[Path]:
    return [out / n for n in (*REPORT_ENTRIES, COURSE_MANIFEST) if (out / n).exists() or (out / n).is_symlink()]


def check_course_out(out: str | Path, overwrite: bool = False) -> None:
    """Raise before any notebook runs when ``out`` cannot take a report (not a folder; a changed one to overwrite)."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose a folder for the report")
    if not overwrite or not out.is_dir() or not _earlier_entries(out):
        return
    changes = report_changes(out)
    keep = "run without --overwrite to keep the earlier report under a dated name"
    if changes is None:
        raise FileExistsError(f"--out {out} holds a report without {COURSE_MANIFEST} (older distill-lab or not ours); "
                              f"refusing to replace it with --overwrite: {keep}")
    if changes:
        raise FileExistsError(f"--out {out} holds report files the course did not write: {name_some(changes)}; "
                              f"refusing to replace them with --overwrite: move them out, or {keep}")


def _dated(out: Path, prefix: str, when: float) -> Path:
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = out / f"{prefix}-{stamp}", 2
    while path.exists() or path.is_symlink():
        path, n = out / f"{prefix}-{stamp}-{n}", n + 1
    return path


def _publish(tmp: Path, out: Path, overwrite: bool) -> Path | None:
    """Make the report in ``tmp`` the one in ``out``; return where the earlier report was kept (None: none kept)."""
    earlier = _earlier_entries(out)
    replaceable = overwrite and bool(earlier) and report_changes(out) == []
    aside = None
    if earlier:  # moved whole into a dated folder first: nothing is removed before the new report is in place
        first = out / "results.json"
        aside = _dated(out, "earlier", first.stat().st_mtime if first.is_file() else time.time())
        aside.mkdir()
        for entry in earlier:
            move(entry, aside / entry.name)
    contents = {rel: sha256_file(path) for rel, path in _report_files(tmp).items()}
    for name in REPORT_ENTRIES:
        if (tmp / name).exists():
            move(tmp / name, out / name)
    atomic_write_text(out / COURSE_MANIFEST, json.dumps({"format": COURSE_FORMAT, "contents": contents}, indent=1))
    if aside is not None and replaceable:
        shutil.rmtree(aside)
        return None
    return aside


def run_course(out: str | Path = "reports", profile: str | None = None,
               notebooks: list[Path] | None = None, overwrite: bool = False) -> Path:
    """Execute every notebook in ``profile`` and write ``out/`` (executed copies, results.json, results.md).

    An earlier report in ``out`` is kept in ``out/earlier-<date>/`` unless ``overwrite`` (then it is
    replaced, if it holds only what the course wrote); a failed or interrupted run changes nothing in
    ``out`` but adds ``out/incomplete-<date>/`` with what it executed.
    """
    prof = get_profile(profile)
    out = Path(out).resolve()
    check_course_out(out, overwrite)  # before any notebook runs
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    tmp = make_tmp_dir(out)
    (tmp / "results").mkdir()
    saved_env = {k: os.environ.get(k) for k in (ENV_VAR, REPORT_ENV)}
    os.environ[ENV_VAR] = prof.name
    os.environ[REPORT_ENV] = str(tmp)
    notebooks = notebooks or find_notebooks()
    timings, failed = {}, None
    try:
        for path in tqdm(notebooks, desc=f"notebooks ({prof.name})", unit="nb"):
            try:
                timings[path.stem] = execute_notebook(path, tmp / "notebooks" / path.name)
            except Exception as err:  # keep the partial report, then fail loudly
                failed = (path.name, err)
                break
        results = {p.stem: json.loads(p.read_text()) for p in sorted((tmp / "results").glob("*.json"))}
        env = environment_info()
        merged = {"profile": prof.name, "env": env, "notebook_seconds": timings, "results": results}
        (tmp / "results.json").write_text(json.dumps(merged, indent=2))
        (tmp / "results.md").write_text(results_markdown(results, prof.name, env, timings))
        aside = _publish(tmp, out, overwrite) if failed is None else None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the report in {out} is unchanged; what ran is kept in {_keep_partial(tmp, out)}") \
            from None
    except BaseException:
        _keep_partial(tmp, out)
        raise
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if failed:
        partial = _keep_partial(tmp, out)
        raise RuntimeError(f"notebook {failed[0]} failed ({type(failed[1]).__name__}); the report in {out} is "
                           f"unchanged, and this run's executed copies (with the error) are in {partial / 'notebooks'}")
    shutil.rmtree(tmp, ignore_errors=True)
    if aside is not None:
        print(f"the earlier report in {out} is kept in {aside}/ (--overwrite replaces it instead)")
    return out


def _keep_partial(tmp: Path, out: Path) -> Path:
    """Rename the report of a failed or interrupted run to ``out/incomplete-<now>`` and return that path."""
    partial = _dated(out, "incomplete", time.time())
    move(tmp, partial)
    return partial
