"""Student versions of the lessons: ``make student`` writes notebooks/student/NN_*.ipynb from notebooks/NN_*.ipynb.

The committed lessons are the solution versions. Each exercise's answer sits between nbgrader's
markers, ``### BEGIN SOLUTION`` and ``### END SOLUTION``; the student version replaces every such region
with ``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the region's indentation (in a markdown
cell, with ``YOUR ANSWER HERE``), clears every output, execution count and the saved widget state, and
opens with a cell that says where it came from. The output is the same bytes on every run (cell ids
are the lesson's own, the header's is fixed, ``nbformat.writes`` orders the keys), so ``--check`` can
tell whether the committed student versions are in sync.

A learner's work is never overwritten. Each student version records in its metadata
(``distill_lab_student``) a digest of the cells it was generated with (type, source, outputs). A
student version whose cells no longer match that digest holds a learner's edits (answers, notes, run
outputs): ``make student`` keeps it as it is and names it, and ``--check`` names it without ever sending
the learner to a command that would replace it.

nbgrader: the lessons carry nbgrader's cell metadata (``exercises.grading``), and ``nbgrader
generate_assignment`` on them writes these same cells (``tests/test_grading.py`` compares them code cell for
code cell). The generator stays because it needs none of nbgrader's gradebook, keeps a learner's edited
copy, and runs in ``make student`` without a course directory.

``python -m distill_lab.exercises.student [--check] [--execute]``: ``--check`` writes nothing and exits 1,
naming the student versions that are missing, out of date or edited. ``--execute`` runs every student version
headless in the current profile (``make student-smoke`` uses the smoke profile) from
``notebooks/student/`` (executed copies in ``reports/student/``) and fails on the first cell that raises.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from pathlib import Path

import nbformat

from .._fs import atomic_write_text
from ..course import NOTEBOOK_DIR, execute_notebook, find_notebooks
from ..timing import stopwatch
from ._check import NOT_ATTEMPTED

__all__ = ["cells_digest", "clear_solutions", "CODE_STUB", "edited_message", "execute_all", "EXECUTED_DIR",
           "generate", "HEADER", "HEADER_ID", "is_edited", "main", "out_of_date", "RECORD_KEY", "render",
           "solution_regions", "STUDENT_DIR", "student_notebook", "survey", "TEXT_STUB", "VOLATILE_CELL_METADATA"]

BEGIN, END = "BEGIN SOLUTION", "END SOLUTION"  # nbgrader matches these inside a line ("### BEGIN SOLUTION")
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
TEXT_STUB = ("YOUR ANSWER HERE",)
STUDENT_DIR = NOTEBOOK_DIR / "student"
EXECUTED_DIR = NOTEBOOK_DIR.parent / "reports" / "student"  # where --execute writes the executed copies
HEADER_ID = "student-version"
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")
RECORD_KEY = "distill_lab_student"  # notebook metadata: {"lesson": name, "cells_sha256": digest of the generated cells}
HEADER = """\
> **Student version** of [`{name}`](../{name}), generated from it by `make student`:
> edit the lesson, not this copy.
>
> Each exercise cell says `# YOUR CODE HERE` and `raise NotImplementedError()`: replace both with your code
> and run the cell, then the check cell under it. The check compares your function with the course's
> reference, on random tensors and on the teacher's own, and names the likely mistake when it finds one. Until you write it, the cells that
> plug your function into the teacher use distill_lab's reference instead and say so in one line
> ("... not attempted yet"), so the lesson still runs from top to bottom."""


def solution_regions(source: str) -> list[tuple[int, int]]:
    """``(begin line, end line)`` of every solution region; ``ValueError`` on a nested, unclosed or stray marker."""
    regions, start = [], None
    for i, line in enumerate(source.split("\n")):
        if BEGIN in line:
            if start is not None:
                raise ValueError(f"line {i + 1}: {BEGIN} inside the region opened at line {start + 1}")
            start = i
        elif END in line:
            if start is None:
                raise ValueError(f"line {i + 1}: {END} without a {BEGIN} before it")
            regions.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"line {start + 1}: {BEGIN} is never closed by an {END}")
    return regions


def clear_solutions(source: str, cell_type: str = "code") -> str:
    """``source`` with every solution region replaced by the stub, indented like the region's BEGIN line."""
    lines = source.split("\n")
    stub = CODE_STUB if cell_type == "code" else TEXT_STUB
    out, last = [], 0
    for begin, end in solution_regions(source):
        indent = re.match(r"\s*", lines[begin]).group(0)
        out += lines[last:begin] + [indent + s for s in stub]
        last = end + 1
    return "\n".join(out + lines[last:])


def cells_digest(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of what a learner can change in a notebook: every cell's type, source and outputs, in order."""
    cells = [[c.get("cell_type"), c.get("source"), c.get("outputs", [])] for c in nb.get("cells", [])]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()


def student_notebook(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The student version of a lesson (a new notebook; ``nb`` is left as it is)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        cell.source = clear_solutions(cell.source, cell.cell_type)
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    header = nbformat.v4.new_markdown_cell(HEADER.format(name=name))
    header["id"] = HEADER_ID
    nb.cells.insert(0, header)
    nb.metadata[RECORD_KEY] = {"lesson": name, "cells_sha256": cells_digest(nb)}
    return nb


def render(path: Path) -> str:
    """The text of the student version of the lesson at ``path`` (what ``nbformat.write`` would write)."""
    text = nbformat.writes(student_notebook(nbformat.read(path, as_version=4), path.name))
    return text if text.endswith("\n") else text + "\n"


def is_edited(path: Path, lesson: Path | None = None) -> bool:
    """True when the student version at ``path`` holds changes made after it was generated (a learner's work).

    The cells are compared with the digest the generator recorded in the notebook's metadata. A file
    without that record (written before the record existed) counts as edited unless its cells are those
    of a fresh version of ``lesson``; a file that is not a readable notebook always counts as edited.
    """
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # not JSON / not a notebook: someone's file, keep it  # noqa: BLE001
        return True
    record = nb.metadata.get(RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("cells_sha256"), str):
        return lesson is None or cells_digest(nb) != cells_digest(nbformat.reads(render(lesson), as_version=4))
    return cells_digest(nb) != record["cells_sha256"]


def survey(lessons: Path = NOTEBOOK_DIR, out: Path | None = None) -> dict[str, list[str]]:
    """Sort the student versions into ``missing``, ``stale`` (generated, lesson changed since), ``edited``
    (a learner changed it: never replaced), ``extra`` (no lesson of that name) and ``current``."""
    out = Path(out) if out is not None else Path(lessons) / "student"
    found = {"missing": [], "stale": [], "edited": [], "extra": [], "current": []}
    expected = {p.name: p for p in find_notebooks(lessons)}
    for name, lesson in expected.items():
        target = out / name
        if not target.is_file():
            found["missing"].append(name)
        elif target.read_bytes() == render(lesson).encode("utf-8"):
            found["current"].append(name)
        else:
            found["edited" if is_edited(target, lesson) else "stale"].append(name)
    if out.is_dir():
        found["extra"] = [p.name for p in find_notebooks(out) if p.name not in expected]
    return found


def generate(lessons: Path = NOTEBOOK_DIR, out: Path | None = None) -> list[Path]:
    """Write the student version of every lesson in ``lessons`` into ``out`` (default ``lessons/student``).

    A student version a learner edited (``is_edited``) is left exactly as it is and not returned;
    ``survey`` names it. Each file is written atomically. Returns the paths that now hold the generated text.
    """
    out = Path(out) if out is not None else Path(lessons) / "student"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in find_notebooks(lessons):
        target = out / path.name
        text = render(path)
        if not (target.is_file() and target.read_bytes() == text.encode("utf-8")):
            if target.exists() and (not target.is_file() or is_edited(target, path)):
                continue  # a learner's work: kept as it is
            atomic_write_text(target, text)
        written.append(target)
    return written


def out_of_date(lessons: Path = NOTEBOOK_DIR, out: Path | None = None) -> list[str]:
    """Names of the student versions that are missing, differ from a fresh generation, or have no lesson."""
    found = survey(lessons, out)
    return (found["missing"] + found["stale"] + [f"{name} (edited)" for name in found["edited"]]
            + [f"{name} (no lesson {name} in {lessons})" for name in found["extra"]])


def edited_message(names: list[str], out: Path | None) -> str:
    """One line for student versions that hold a learner's edits: kept, and how to see the new version beside them."""
    fresh = "python -m distill_lab.exercises.student --out notebooks/student-new"
    return (f"kept {', '.join(names)} in {out or STUDENT_DIR}: edited since it was generated (your work is never "
            f"replaced); to get the lesson's current version beside it, run `{fresh}`")


def _not_attempted_lines(nb: nbformat.NotebookNode) -> int:
    """How many printed lines say that an exercise is not attempted yet."""
    return sum(out.get("text", "").count(NOT_ATTEMPTED) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def execute_all(folder: Path = STUDENT_DIR, timeout: int = 1800, executed: Path = EXECUTED_DIR) -> dict[str, float]:
    """Run every student version headless (cwd = ``folder``, ``timeout`` seconds per cell); return seconds per notebook.

    The executed copies go to ``executed``. Raises on the first cell that fails, and when a notebook
    printed no "not attempted yet" line (its stubs were not reached, so the fallbacks were not exercised).
    """
    timings = {}
    for path in find_notebooks(folder):
        elapsed = stopwatch()
        execute_notebook(path, Path(executed) / path.name, timeout=timeout)
        timings[path.name] = elapsed()
        stubs = _not_attempted_lines(nbformat.read(Path(executed) / path.name, as_version=4))
        if not stubs:
            raise RuntimeError(f"student {path.name} printed no '{NOT_ATTEMPTED}' line: are its exercises stubs?")
        print(f"student {path.name}: ran top to bottom in {timings[path.name]:.0f} s "
              f"({stubs} '{NOT_ATTEMPTED}' lines)", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_lab.exercises.student", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--check", action="store_true", help="write nothing; exit 1 if a student version is out of date")
    add("--execute", action="store_true", help="then run every student version headless")
    add("--out", type=Path, default=None, help="folder of the student versions (default notebooks/student)")
    add("--timeout", type=int, default=1800, help="seconds a cell may run with --execute (default 1800)")
    add("--executed", type=Path, default=EXECUTED_DIR, help="where --execute writes the executed copies "
        "(default reports/student)")
    args = parser.parse_args(argv)
    found = survey(out=args.out)
    if args.check:
        stale = found["missing"] + found["stale"] + [f"{n} (no lesson of that name)" for n in found["extra"]]
        if stale:
            print("student versions out of date: " + ", ".join(stale) + " (`make student` updates them; it never "
                  "replaces a notebook you edited)", file=sys.stderr)
        if found["edited"]:
            print(edited_message(found["edited"], args.out), file=sys.stderr)
        if stale or found["edited"]:
            return 1
        print("student versions are in sync with the lessons")
    else:
        for path in generate(out=args.out):
            print(f"wrote {path}")
        if found["edited"]:
            print(edited_message(found["edited"], args.out), file=sys.stderr)
            return 1
    if args.execute:
        execute_all(args.out or STUDENT_DIR, args.timeout, args.executed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
