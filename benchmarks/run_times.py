"""The course map's run times, read from the committed notebooks' own cell timings.

A notebook's run time is its last code cell's reply minus its first code cell's start (each code cell's
``metadata.execution``: ``iopub.execute_input`` and ``shell.execute_reply``), in minutes with one
decimal. The course maps in README.md, notebook 00's course-map cell and docs/teaching.md hold a table
between ``<!-- run-times`` and ``<!-- /run-times -->``: this script writes the column whose header starts
with "run time" and the footnote under the table (the profile, torch threads, date and CPU the notebooks
print); it changes nothing else. tests/test_run_times.py checks that the three agree with the notebooks.

Usage: python benchmarks/run_times.py            print the run times and whether each course map agrees
       python benchmarks/run_times.py --check    the same, and exit 1 when one does not
       python benchmarks/run_times.py --write    rewrite the course maps that do not
(After --write, ``make student`` brings notebooks/student/00_baseline.ipynb along.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

__all__ = ["BEGIN", "END", "course_map_cell", "footnote", "main", "notebook_runs", "rewrite", "run_time",
           "TARGETS", "write_targets"]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
TARGETS = ("README.md", "notebooks/00_baseline.ipynb", "docs/teaching.md")
BEGIN, END = "<!-- run-times", "<!-- /run-times -->"
_REGION = re.compile(re.escape(BEGIN) + r"[^\n]*-->\n(.*?)\n" + re.escape(END), re.DOTALL)
_PROFILE = re.compile(r"profile: (\w+) \| device: (\w+) \| torch threads: (\d+)")
_CPU = re.compile(r"^CPU:\s+(.+?)\s*$", re.MULTILINE)
_ISA = re.compile(r"^ISA flags:\s+(.*)$", re.MULTILINE)


def _when(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            for text in (out.get("text", ""), out.get("data", {}).get("text/plain", "")):
                parts.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(parts)


def run_time(nb: dict, name: str = "notebook") -> tuple[float, datetime.datetime, datetime.datetime]:
    """(minutes, first cell's start, last cell's reply) of an executed notebook.

    ValueError when a code cell has no timing (a notebook saved without running it).
    """
    starts, replies = [], []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" not in timing or "shell.execute_reply" not in timing:
            raise ValueError(f"{name} cell {index} has no execution timing (metadata.execution); "
                             f"execute the whole notebook (make run) before reading its run time")
        starts.append(_when(timing["iopub.execute_input"]))
        replies.append(_when(timing["shell.execute_reply"]))
    if not starts:
        raise ValueError(f"{name} has no code cell, so no run time")
    first, last = min(starts), max(replies)
    return (last - first).total_seconds() / 60, first, last


def notebook_runs(folder: Path = NOTEBOOK_DIR) -> dict[str, dict]:
    """{"00": {"minutes", "date", "profile", "threads", "cpu", "amx"}} for every ``NN_*.ipynb`` in ``folder``.

    What a notebook does not print is None: every lesson prints its profile and threads; 00 and 02 print
    the CPU, and 00 its ISA flags (whether it has Intel's AMX matrix units, which decide many timings).
    """
    runs = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        minutes, first, _ = run_time(nb, path.name)
        text = _outputs_text(nb)
        profile, cpu, isa = _PROFILE.search(text), _CPU.search(text), _ISA.search(text)
        runs[path.name[:2]] = {"minutes": minutes, "date": first.date().isoformat(),
                               "cpu": cpu.group(1) if cpu else None,
                               # "ISA flags: avx2 ... (absent: amx_bf16 ...)" lists what the CPU lacks after "absent"
                               "amx": "amx_" in isa.group(1).split("(absent")[0] if isa else None,
                               "profile": profile.group(1) if profile else None,
                               "threads": profile.group(3) if profile else None}
    if not runs:
        raise FileNotFoundError(f"no notebook NN_*.ipynb in {folder}")
    return runs


def _one_or_each(runs: dict, key: str, unit: str = "") -> str | None:
    values = {run[key] for run in runs.values() if run[key] is not None}
    if not values:
        return None
    if len({run[key] for run in runs.values()}) == 1:
        return f"{values.pop()}{unit}"
    return ", ".join(f"{nb}: {run[key] or 'not printed'}{unit}" for nb, run in runs.items())


def footnote(runs: dict) -> str:
    """The line under the course-map table: what the run times were measured on, as the notebooks record it."""
    basis = [f"{_one_or_each(runs, key)} {what}" for key, what in (("profile", "profile"), ("threads", "torch threads"))
             if _one_or_each(runs, key)]
    printed = [nb for nb, run in runs.items() if run["cpu"]]
    cpus = {runs[nb]["cpu"] for nb in printed}
    amx = {run["amx"] for run in runs.values() if run["amx"] is not None}
    if not printed:
        cpu = "; the CPU is not recorded in the notebooks (the committed run)"
    elif len(cpus) == 1:
        with_amx = "" if len(amx) != 1 else " with AMX" if amx.pop() else " without AMX"
        verb = "prints" if len(printed) == 1 else "print"
        cpu = f" on {cpus.pop()}{with_amx} (the CPU as {' and '.join(printed)} {verb} it)"
    else:
        cpu = " on the CPUs " + ", ".join(f"{runs[nb]['cpu']} ({nb})" for nb in printed)
    when = basis + [f"executed {_one_or_each(runs, 'date')}"]
    return (f"\\*Run time: the committed notebooks' own cell timings (first cell's start to last cell's end), "
            f"{', '.join(when)}{cpu}. Written by `python benchmarks/run_times.py --write`.")


def _cells(row: str) -> list[str]:
    return row.strip().strip("|").split("|")


def _rewrite_table(body: str, runs: dict, where: str) -> str:
    lines = [line for line in body.split("\n") if line.strip().startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"{where}: no table between {BEGIN} and {END}")
    header = [cell.strip().lower() for cell in _cells(lines[0])]
    column = next((i for i, name in enumerate(header) if name.startswith("run time")), None)
    if column is None:
        raise ValueError(f"{where}: the course-map table has no column whose header starts with 'run time' "
                         f"(headers: {header})")
    rows = lines[:2]
    for line in lines[2:]:
        cells = _cells(line)
        nb = re.search(r"(?<!\d)(\d\d)(?!\d)", cells[0])
        if nb is None or nb.group(1) not in runs:
            raise ValueError(f"{where}: course-map row {line!r} names no notebook of {sorted(runs)}")
        cells[column] = f" {runs[nb.group(1)]['minutes']:.1f} min "
        rows.append("|" + "|".join(cells) + "|")
    return "\n" + "\n".join(rows) + "\n\n" + footnote(runs) + "\n"


def rewrite(text: str, runs: dict, where: str = "text") -> str:
    """``text`` with every run-times region's table column and footnote written from ``runs``."""
    if not _REGION.search(text):
        raise ValueError(f"{where} has no {BEGIN} ... {END} region")
    def region(m: re.Match) -> str:
        head, tail = text[m.start():m.start(1)], text[m.end(1):m.end()]
        return head + _rewrite_table(m.group(1), runs, where) + tail

    return _REGION.sub(region, text)


def course_map_cell(nb: dict) -> int:
    """Index of the markdown cell of ``nb`` that holds the run-times region."""
    found = [i for i, cell in enumerate(nb["cells"])
             if cell["cell_type"] == "markdown" and BEGIN in "".join(cell["source"])]
    if len(found) != 1:
        raise ValueError(f"expected one markdown cell with {BEGIN}, found {len(found)}")
    return found[0]


def _rewritten(path: Path, runs: dict) -> tuple[str, str]:
    """(current text, text with the run times written) of one target file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text, rewrite(text, runs, path.name)
    nb = json.loads(text)
    cell = nb["cells"][course_map_cell(nb)]
    cell["source"] = rewrite("".join(cell["source"]), runs, path.name).splitlines(keepends=True)
    return text, json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def write_targets(root: Path = ROOT, write: bool = False) -> list[str]:
    """The targets whose course map differs from the notebooks' timings (rewritten when ``write``)."""
    runs, stale = notebook_runs(root / "notebooks"), []
    for name in TARGETS:
        old, new = _rewritten(root / name, runs)
        if old != new:
            stale.append(name)
            if write:
                (root / name).write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the course maps that differ")
    parser.add_argument("--check", action="store_true", help="exit 1 when a course map differs")
    args = parser.parse_args(argv)
    runs = notebook_runs(ROOT / "notebooks")
    for nb, run in runs.items():
        print(f"{nb}: {run['minutes']:.1f} min  ({run['profile']} profile, {run['threads']} threads, {run['date']}, "
              f"CPU {run['cpu'] or 'not printed'})")
    stale = write_targets(ROOT, write=args.write)
    for name in stale:
        print(f"{name}: {'rewritten' if args.write else 'differs (--write rewrites it)'}")
    if not stale:
        print("every course map agrees with the notebooks' timings")
    return 1 if stale and args.check and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
