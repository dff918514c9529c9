"""nbgrader-ready lessons (issue 33): solution cells, locked graded check cells with points, and nbgrader's own
release equal to our student versions, code cell for code cell; an autograded submission earns points only
for a correct answer."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from distill_lab.exercises import _check
from distill_lab.exercises.grading import (CHECK_SUFFIX, LAB_POINTS, NBGRADER_KEY, expected_metadata, missing_metadata,
                                           split_check, stamp)
from distill_lab.exercises.student import render, solution_regions

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))

SOLVED = '''def my_amdahl(share, speedup):
    """Speed-up of a whole step when `share` of its time runs `speedup` times faster."""
    ### BEGIN SOLUTION
    return 1 / ((1 - share) + share / speedup)
    ### END SOLUTION


check_amdahl(my_amdahl);'''


def _nb(solution: str = SOLVED) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from distill_lab.exercises.roofline import check_amdahl"),
                nbformat.v4.new_code_cell(solution)]
    nb.cells[0]["id"], nb.cells[1]["id"] = "setup", "i29-00-amdahl"
    return nb


def _split(nb):
    sol, chk = split_check(nb.cells[1].source)
    nb.cells[1].source = sol
    check = nbformat.v4.new_code_cell(chk)
    check["id"] = nb.cells[1].id + CHECK_SUFFIX
    nb.cells.insert(2, check)
    stamp(nb)
    return nb


def test_split_check_moves_what_follows_the_last_solution_region():
    sol, chk = split_check(SOLVED)
    assert sol.endswith("### END SOLUTION") and chk == "check_amdahl(my_amdahl);"
    assert split_check("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION") [1] == ""
    with pytest.raises(ValueError, match="no ### BEGIN SOLUTION"):
        split_check("x = 1")


def test_metadata_is_checked_and_a_planted_problem_is_named():
    nb = _nb()
    problems = missing_metadata(nb)
    assert any("must move to the next cell, i29-00-amdahl-check" in p for p in problems), problems
    nb = _split(nb)
    assert missing_metadata(nb) == []
    meta = nb.cells[2].metadata[NBGRADER_KEY]
    assert meta["grade"] and meta["locked"] and not meta["solution"] and meta["points"] == LAB_POINTS
    assert nb.cells[1].metadata[NBGRADER_KEY]["solution"] and not nb.cells[1].metadata[NBGRADER_KEY]["locked"]
    nb.cells[2].metadata[NBGRADER_KEY]["points"] = 0
    assert any("i29-00-amdahl-check: nbgrader metadata" in p for p in missing_metadata(nb))
    nb.cells[0].metadata[NBGRADER_KEY] = {"solution": True}
    assert any("setup: nbgrader metadata on a cell that is neither" in p for p in missing_metadata(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_and_lab_carries_nbgrader_metadata(path):
    nb = nbformat.read(path, as_version=4)
    assert missing_metadata(nb) == [], "run: python -m distill_lab.exercises.grading"
    want = expected_metadata(nb)
    solutions = [c.id for c in nb.cells if solution_regions(c.source)]
    graded = [cid for cid, m in want.items() if m["grade"]]
    assert solutions and graded, f"{path.name}: no solution or no graded check cell"
    assert all(cid.removesuffix(CHECK_SUFFIX) in solutions for cid in graded)


def test_an_unattempted_check_prints_in_a_lesson_and_fails_under_the_autograder(monkeypatch, capsys):
    from distill_lab.exercises.roofline import check_amdahl

    def stub(share, speedup):
        raise NotImplementedError()

    monkeypatch.delenv(_check.AUTOGRADE_ENV, raising=False)
    assert check_amdahl(stub) is False and _check.NOT_ATTEMPTED in capsys.readouterr().out
    monkeypatch.setenv(_check.AUTOGRADE_ENV, "autograde")
    with pytest.raises(AssertionError, match=_check.NOT_ATTEMPTED):
        check_amdahl(stub)


def _nbgrader(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([sys.executable, "-m", "nbgrader", *args, "--force"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def _course(tmp_path: Path) -> Path:
    (tmp_path / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(tmp_path)!r}\n"
        f"c.CourseDirectory.db_url = 'sqlite:///{tmp_path}/gradebook.db'\n"
        "c.ExecutePreprocessor.timeout = 300\n")
    return tmp_path


def test_nbgrader_releases_exactly_our_student_versions(tmp_path):
    pytest.importorskip("nbgrader")
    root = _course(tmp_path)
    (root / "source" / "lessons").mkdir(parents=True)
    for p in NOTEBOOKS:
        shutil.copy(p, root / "source" / "lessons" / p.name)
    done = _nbgrader(root, "generate_assignment", "lessons")
    assert done.returncode == 0, done.stderr[-3000:]
    for p in NOTEBOOKS:
        theirs = nbformat.read(root / "release" / "lessons" / p.name, as_version=4)
        ours = nbformat.reads(render(p), as_version=4)
        assert [c.source for c in theirs.cells if c.cell_type == "code"] == \
               [c.source for c in ours.cells if c.cell_type == "code"], p.name
        assert [c.source for c in theirs.cells if c.cell_type == "markdown"] == \
               [c.source for c in ours.cells if c.cell_type == "markdown" and c.id != "student-version"], p.name


def test_nbgrader_autograde_gives_points_only_to_a_correct_answer(tmp_path):
    pytest.importorskip("nbgrader")
    root = _course(tmp_path)
    (root / "source" / "ps1").mkdir(parents=True)
    nbformat.write(_split(_nb()), root / "source" / "ps1" / "amdahl.ipynb")
    done = _nbgrader(root, "generate_assignment", "ps1")
    assert done.returncode == 0, done.stderr[-3000:]
    released = nbformat.read(root / "release" / "ps1" / "amdahl.ipynb", as_version=4)
    assert "raise NotImplementedError()" in released.cells[1].source
    answers = {"solved": "return 1 / ((1 - share) + share / speedup)",
               "wrong": "return 1 / ((1 - share) + speedup)",  # the time, not the speed-up
               "blank": None}
    for student, answer in answers.items():
        nb = nbformat.read(root / "release" / "ps1" / "amdahl.ipynb", as_version=4)
        if answer:
            nb.cells[1].source = nb.cells[1].source.replace("# YOUR CODE HERE\n    raise NotImplementedError()",
                                                            answer)
        (root / "submitted" / student / "ps1").mkdir(parents=True)
        nbformat.write(nb, root / "submitted" / student / "ps1" / "amdahl.ipynb")
        graded = _nbgrader(root, "autograde", "ps1", "--student", student, "--create")
        assert graded.returncode == 0, graded.stderr[-3000:]
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{root}/gradebook.db") as gradebook:
        scores = {student: gradebook.find_submission("ps1", student).score for student in answers}
    assert scores == {"solved": LAB_POINTS, "wrong": 0, "blank": 0}, scores
