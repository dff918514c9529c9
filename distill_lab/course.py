"""Run the whole course headless: execute every notebook and collect their measured results.

``make run`` calls ``python -m distill_lab course --out reports``. Each notebook saves its key
numbers with ``distill_lab.record`` into ``$DISTILL_LAB_REPORT_DIR/results/``; this module sets
that variable, executes the notebooks with nbclient, and merges the records into
``results.json`` and ``results.md`` next to the executed copies.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from .evaluate import REPORT_ENV, environment_info
from .profiles import ENV_VAR, get_profile

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
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # store_widget_state: the knobs' models (and each Output's figure) go into metadata.widgets,
    # so a static view of the committed notebook shows the controls, not "interactive(children=...".
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=kernel_env())
    finally:
        strip_progress_bars(nb)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_path)
    return time.perf_counter() - start


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


def run_course(out: str | Path = "reports", profile: str | None = None,
               notebooks: list[Path] | None = None) -> Path:
    """Execute every notebook in ``profile`` and write ``out/`` (executed copies, results.json, results.md)."""
    prof = get_profile(profile)
    out = Path(out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    for old in (out / "results").glob("*.json"):
        old.unlink()
    os.environ[ENV_VAR] = prof.name
    os.environ[REPORT_ENV] = str(out)
    notebooks = notebooks or find_notebooks()
    timings, failed = {}, None
    for path in tqdm(notebooks, desc=f"notebooks ({prof.name})", unit="nb"):
        try:
            timings[path.stem] = execute_notebook(path, out / "notebooks" / path.name)
        except Exception as err:  # keep the partial report, then fail loudly
            failed = (path.name, err)
            break
    results = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    env = environment_info()
    merged = {"profile": prof.name, "env": env, "notebook_seconds": timings, "results": results}
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    (out / "results.md").write_text(results_markdown(results, prof.name, env, timings))
    if failed:
        raise RuntimeError(f"notebook {failed[0]} failed ({type(failed[1]).__name__}); "
                           f"the executed copy with the error is in {out / 'notebooks'}")
    return out
