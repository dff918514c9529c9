"""The student versions: generated from the lessons byte for byte, with no solution left in them.

``make student`` writes ``notebooks/student/``; ``make student-smoke`` runs them (not here: minutes).
"""

import nbformat
import pytest

from distill_lab.course import NOTEBOOK_DIR, find_notebooks
from distill_lab.exercises import student

LESSONS = find_notebooks()


def test_make_student_regenerates_the_committed_versions_identically(tmp_path):
    written = student.generate(out=tmp_path)
    assert [p.name for p in written] == [p.name for p in LESSONS]
    for path in written:
        committed = NOTEBOOK_DIR / "student" / path.name
        assert committed.is_file(), f"{committed} is missing: run `make student`"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is out of date: run `make student`"
    again = tmp_path / "again"
    student.generate(out=again)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in written), "two runs differ"
    assert student.out_of_date() == []


def test_check_names_what_is_out_of_date(tmp_path, capsys):
    student.generate(out=tmp_path)
    assert student.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / LESSONS[1].name).write_text((tmp_path / LESSONS[1].name).read_text() + " ")
    (tmp_path / LESSONS[2].name).unlink()
    assert student.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert LESSONS[1].name in err and LESSONS[2].name in err and LESSONS[0].name not in err


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_solution_regions_are_well_formed_and_every_lesson_has_exercises(path):
    nb = nbformat.read(path, as_version=4)
    regions = [(c, student.solution_regions(c.source)) for c in nb.cells]  # raises on a malformed region
    exercises = [c.id for c, found in regions if found and c.cell_type == "code" and "def my_" in c.source]
    assert len(exercises) >= 2, f"{path.name}: fewer than two exercise cells with a solution region"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_student_cells_hold_no_solution_text(path):
    lesson = {c.id: c for c in nbformat.read(path, as_version=4).cells}
    version = nbformat.reads(student.render(path), as_version=4)
    assert version.cells[0].id == student.HEADER_ID and f"../{path.name}" in version.cells[0].source
    assert "widgets" not in version.metadata
    for cell in version.cells[1:]:
        assert student.BEGIN not in cell.source and student.END not in cell.source
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None and "execution" not in cell.metadata
        source = lesson[cell.id].source.split("\n")
        for begin, end in student.solution_regions(lesson[cell.id].source):
            answer = [ln.strip() for ln in source[begin + 1:end] if len(ln.strip()) > 8]
            kept = {ln.strip() for ln in cell.source.split("\n")}
            leaked = [ln for ln in answer if ln in kept]
            assert not leaked, f"{path.name} cell {cell.id}: solution lines left in the student version: {leaked}"
            assert "raise NotImplementedError()" in cell.source or "YOUR ANSWER HERE" in cell.source


def test_clear_solutions_keeps_the_indentation_and_the_rest():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\n\ncheck(f)"
    assert student.clear_solutions(source) == ("def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
                                               "\n\n\ncheck(f)")
    assert student.clear_solutions("A\n### BEGIN SOLUTION\nsecret\n### END SOLUTION", "markdown") == \
        "A\nYOUR ANSWER HERE"
    assert student.clear_solutions("no region") == "no region"


@pytest.mark.parametrize("source,problem", [
    ("### BEGIN SOLUTION\nx\n### BEGIN SOLUTION\n### END SOLUTION", "inside the region"),
    ("### BEGIN SOLUTION\nx", "never closed"),
    ("x\n### END SOLUTION", "without a BEGIN SOLUTION"),
])
def test_malformed_regions_are_refused(source, problem):
    with pytest.raises(ValueError, match=problem):
        student.solution_regions(source)


def test_not_attempted_lines_are_counted():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    text = "perplexity: not attempted yet - ...\nmy_f not attempted yet: ...\n"
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    assert student._not_attempted_lines(nb) == 2


# -- issue 28, finding 1: a learner's answers survive `make student`; --check never sends them to a destructive command

def _answer_first_exercise(path):
    """Fill in the first exercise stub the way a learner does in Jupyter (read, edit, save)."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "raise NotImplementedError()" in c.source)
    cell.source = cell.source.replace("raise NotImplementedError()", "return 42  # my answer")
    nbformat.write(nb, path)
    return path.read_bytes()


def test_make_student_keeps_a_learners_answers(tmp_path, capsys):
    student.generate(out=tmp_path)
    mine = tmp_path / LESSONS[1].name
    answered = _answer_first_exercise(mine)
    (tmp_path / LESSONS[2].name).unlink()  # missing: written again
    assert student.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert mine.read_bytes() == answered, "make student replaced a learner's answers"
    assert LESSONS[1].name in err and "kept" in err and "\n" not in err.strip()
    assert (tmp_path / LESSONS[2].name).read_bytes() == student.render(LESSONS[2]).encode()
    assert student.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert LESSONS[1].name in err and "run `make student`" not in err and "never" in err
    assert mine.read_bytes() == answered
    assert student.survey(out=tmp_path)["edited"] == [LESSONS[1].name]


def test_make_student_updates_an_untouched_version_of_an_older_lesson(tmp_path):
    student.generate(out=tmp_path)
    path = tmp_path / LESSONS[0].name
    nb = nbformat.read(path, as_version=4)  # what an older lesson generated: other text, its own record
    nb.cells[1].source += "\nan older sentence"
    nb.metadata[student.RECORD_KEY]["cells_sha256"] = student.cells_digest(nb)
    nbformat.write(nb, path)
    assert student.survey(out=tmp_path)["stale"] == [LESSONS[0].name]
    assert student.main(["--out", str(tmp_path)]) == 0
    assert path.read_bytes() == student.render(LESSONS[0]).encode()


def test_a_version_without_the_record_is_replaced_only_when_untouched(tmp_path):
    student.generate(out=tmp_path)
    for i, edit in ((0, False), (1, True)):
        path = tmp_path / LESSONS[i].name
        nb = nbformat.read(path, as_version=4)  # as written before the record existed
        del nb.metadata[student.RECORD_KEY]
        nbformat.write(nb, path)
        if edit:
            _answer_first_exercise(path)
    before = (tmp_path / LESSONS[1].name).read_bytes()
    student.generate(out=tmp_path)
    assert (tmp_path / LESSONS[0].name).read_bytes() == student.render(LESSONS[0]).encode()
    assert (tmp_path / LESSONS[1].name).read_bytes() == before
    (tmp_path / LESSONS[3].name).write_text("not a notebook")  # unreadable: kept too
    student.generate(out=tmp_path)
    assert (tmp_path / LESSONS[3].name).read_text() == "not a notebook"
