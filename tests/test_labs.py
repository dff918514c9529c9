"""The algorithm labs (issue 29): in every lesson the learner writes a real algorithm (15-60 lines), and the next
cell runs it on the real teacher beside the package's result.

A lab is a solution cell whose id starts with ``i29-NN-`` (NN the lesson), then its graded ``-check`` cell (nbgrader),
then its ``-apply`` cell.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
LAB = re.compile(r"^i29-(\d\d)-[a-z0-9]+$")


def _labs(path: Path) -> dict[str, dict]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    ids = [c.get("id", "") for c in cells]
    labs = {}
    for i, c in enumerate(cells):
        if c["cell_type"] == "code" and LAB.match(c.get("id", "")):
            src = "".join(c["source"])
            blocks = re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", src, re.S)
            lines = [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            check = "".join(cells[i + 1]["source"]) if ids[i + 1] == c["id"] + "-check" else ""
            nxt = i + 2 if check else i + 1
            apply = "".join(cells[nxt]["source"]) if ids[nxt] == c["id"] + "-apply" else None
            labs[c["id"]] = {"lines": len(lines), "apply": apply, "source": src + check, "check": check}
    return labs


def test_every_lesson_has_a_lab_and_there_are_at_least_eight():
    labs = {p.name: _labs(p) for p in NOTEBOOKS}
    assert all(labs.values()), f"lessons without a lab: {[n for n, v in labs.items() if not v]}"
    assert sum(len(v) for v in labs.values()) >= 8, {n: sorted(v) for n, v in labs.items()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_lab_is_15_to_60_lines_and_runs_on_the_teacher_next(path):
    for lab, info in _labs(path).items():
        assert 15 <= info["lines"] <= 60, f"{path.name} {lab}: {info['lines']} solution lines (allowed 15-60)"
        assert info["check"], f"{path.name} {lab}: the next cell must be its graded check, {lab}-check"
        assert info["apply"] is not None, f"{path.name} {lab}: after {lab}-check comes {lab}-apply"
        assert "teacher" in info["source"] + info["apply"] and "by" in info["apply"], \
            f"{path.name} {lab}-apply must run the learner's function on the teacher and say whose result it printed"
