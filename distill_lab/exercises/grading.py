"""nbgrader cell metadata for the lessons: solution cells, and locked, graded check cells with points.

nbgrader (https://nbgrader.readthedocs.io, Jupyter Development Team) grades a notebook by its cells'
metadata (``metadata.nbgrader``, schema 3):

* an **autograded answer** is a solution cell (``solution: true``, ``grade: false``): the learner's code,
  between ``### BEGIN SOLUTION`` and ``### END SOLUTION``;
* an **autograder test** is a locked grade cell (``grade: true``, ``solution: false``, ``locked: true``,
  ``points``): it earns its points when it runs without raising.

In the lessons every exercise and lab is a solution cell; when the exercise has a check
(``check_...(my_fn, ...)``), the check sits in the next cell, ``<id>-check``, which is the grade cell.
Predictions (``my_guess_...``) and the recipe choice are solution cells without a test: nothing to grade
automatically. Points: 1 for each function an exercise's check tests, 3 for each function of an algorithm
lab (``i29-...``). Under nbgrader's autograder (``NBGRADER_EXECUTION=autograde``) a check whose exercise is
not attempted raises, so it earns no points (``_check.check``); in a lesson it prints "not attempted yet" and
the lesson runs on.

``python -m distill_lab.exercises.grading [--check]`` writes (or, with ``--check``, only verifies) that
metadata in every lesson; ``make student`` then carries it into the student versions, which are what
``nbgrader generate_assignment`` releases (``tests/test_grading.py`` runs nbgrader and compares them,
code cell for code cell).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import nbformat

from .._fs import atomic_write_text
from ..course import NOTEBOOK_DIR, find_notebooks
from .student import solution_regions

__all__ = ["CHECK_SUFFIX", "check_calls", "expected_metadata", "LAB_POINTS", "main", "missing_metadata",
           "NBGRADER_KEY", "POINTS", "split_check", "stamp"]

NBGRADER_KEY = "nbgrader"
SCHEMA_VERSION = 3
CHECK_SUFFIX = "-check"
POINTS, LAB_POINTS = 1, 3  # per function a check tests: an exercise, an algorithm lab
LAB_ID = re.compile(r"^i29-\d\d-")
CHECK_CALL = re.compile(r"^check_\w+\(", re.M)


def split_check(source: str) -> tuple[str, str]:
    """``(solution part, check part)`` of a cell: the check part is every top-level statement after the last one
    that holds a solution region (``""`` when there is none). ``ValueError`` when the cell has no solution region."""
    regions = solution_regions(source)
    if not regions:
        raise ValueError("no ### BEGIN SOLUTION region in this cell")
    last_end = regions[-1][1] + 1  # 1-based line of the last END marker
    tree = ast.parse(source)
    # the END marker is a comment: it may sit after the last statement of the function that holds it
    before = [node for node in tree.body if node.lineno <= last_end]
    cut = max([last_end] + [node.end_lineno for node in before[-1:]])
    lines = source.split("\n")
    return "\n".join(lines[:cut]).rstrip("\n"), "\n".join(lines[cut:]).strip("\n")


def check_calls(source: str) -> int:
    """How many ``check_...(`` calls start a line of ``source`` (each tests one of the learner's functions)."""
    return len(CHECK_CALL.findall(source))


def _meta(grade_id: str, solution: bool, grade: bool, points: int | None = None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": not solution, "schema_version": SCHEMA_VERSION,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def expected_metadata(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """Cell id -> the nbgrader metadata that cell must carry (solution cells and the check cells after them)."""
    out = {}
    for i, cell in enumerate(nb.cells):
        if not solution_regions(cell.source):
            continue
        out[cell.id] = _meta(cell.id, solution=True, grade=False)
        nxt = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if nxt is not None and nxt.cell_type == "code" and nxt.id == cell.id + CHECK_SUFFIX:
            per = LAB_POINTS if LAB_ID.match(cell.id) else POINTS
            out[nxt.id] = _meta(nxt.id, solution=False, grade=True, points=per * max(1, check_calls(nxt.source)))
    return out


def missing_metadata(nb: nbformat.NotebookNode) -> list[str]:
    """Problems, one line each: a solution cell whose check was not split off, or metadata that differs."""
    problems = []
    want = expected_metadata(nb)
    by_id = {c.id: c for c in nb.cells}
    for cell in nb.cells:
        if cell.cell_type == "code" and solution_regions(cell.source) and check_calls(split_check(cell.source)[1]):
            problems.append(f"{cell.id}: its check_...() call must move to the next cell, {cell.id}{CHECK_SUFFIX}")
    for cid, meta in want.items():
        if by_id[cid].metadata.get(NBGRADER_KEY) != meta:
            problems.append(f"{cid}: nbgrader metadata {by_id[cid].metadata.get(NBGRADER_KEY)}, expected {meta}")
    for cell in nb.cells:
        if NBGRADER_KEY in cell.metadata and cell.id not in want:
            problems.append(f"{cell.id}: nbgrader metadata on a cell that is neither a solution nor its check")
    return problems


def stamp(nb: nbformat.NotebookNode) -> bool:
    """Write the expected nbgrader metadata into ``nb`` (in place); True when anything changed."""
    want, changed = expected_metadata(nb), False
    for cell in nb.cells:
        meta = want.get(cell.id)
        if meta is None and NBGRADER_KEY in cell.metadata:
            del cell.metadata[NBGRADER_KEY]
            changed = True
        elif meta is not None and cell.metadata.get(NBGRADER_KEY) != meta:
            cell.metadata[NBGRADER_KEY] = meta
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_lab.exercises.grading", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming what is missing")
    parser.add_argument("--lessons", type=Path, default=NOTEBOOK_DIR)
    args = parser.parse_args(argv)
    bad = 0
    for path in find_notebooks(args.lessons):
        nb = nbformat.read(path, as_version=4)
        if args.check:
            for line in missing_metadata(nb):
                print(f"{path.name}: {line}")
                bad += 1
        elif stamp(nb):
            atomic_write_text(path, nbformat.writes(nb) + "\n")
            print(f"{path.name}: nbgrader metadata written")
        else:
            print(f"{path.name}: up to date")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
