"""The teaching guide's schedules run: docs/teaching.md's schedule table, checked against the notebooks.

The table names, for each part of a schedule, the notebooks it uses, the sections it runs first without
discussion and the sections it teaches (a section is a notebook's ``## N · Title`` heading, named as
``N · start of its title``; ``opening cells`` are the cells above section 1; ``all`` is the whole notebook).

* Every section a row names must exist under that title (cheap: the notebooks are only read).
* A row that runs a subset of a notebook is built into a notebook of exactly those cells, in notebook order,
  and executed top to bottom in the smoke profile (as ``make test``'s nbval runs the lessons); a failing cell
  is reported with the schedule, the notebook, the cell's index and id and its section.
* A row that runs whole notebooks is not executed here: the nbval run of ``make test`` already executes every
  lesson whole in the same profile; the test checks that the Makefile's nbval target covers those notebooks.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from distill_lab.course import NOTEBOOK_DIR, find_notebooks, kernel_env
from distill_lab.evaluate.records import REPORT_ENV

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "teaching.md"
HEADER = "| schedule | notebooks | run first, without discussion | teach | run by `make test` |"
OPENING = "opening cells"  # the cells above section 1
ALL = "all"
BY_NBVAL, BY_TEST = "nbval (whole notebooks)", "tests/test_teaching.py"
SECTION_HEADING = re.compile(r"^## (\d+) · (.+)$", re.MULTILINE)
SECTION_REF = re.compile(r"^(\d+) · (.+)$")


def parse_schedules(text: str) -> list[dict]:
    """The rows of the guide's schedule table: name, notebooks (two-digit prefixes), setup, teach, run_by."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADER]
    if len(starts) != 1:
        raise ValueError(f"docs/teaching.md must hold the schedule table once (header {HEADER!r}); "
                         f"found it {len(starts)} times")
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5:
            raise ValueError(f"schedule row {line!r} has {len(cells)} columns, expected 5")
        name, notebooks, setup, teach, run_by = cells
        rows.append({"name": name, "notebooks": [n.strip() for n in notebooks.split(",")],
                     "setup": [s.strip() for s in setup.split(";") if s.strip()],
                     "teach": [s.strip() for s in teach.split(";") if s.strip()], "run_by": run_by})
    if not rows:
        raise ValueError("docs/teaching.md's schedule table has no rows")
    return rows


def notebook_path(prefix: str) -> Path:
    """The solution notebook ``notebooks/<prefix>_*.ipynb``."""
    found = [p for p in find_notebooks() if p.name.startswith(f"{prefix}_")]
    if len(found) != 1:
        raise ValueError(f"notebook {prefix!r} names {len(found)} lessons; expected one of "
                         f"{[p.name[:2] for p in find_notebooks()]}")
    return found[0]


def sections(nb) -> list[tuple[int, str]]:
    """(number, title) of each cell's section: the last ``## N · Title`` heading at or above it; 0 above the first."""
    current, out = (0, OPENING), []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for number, title in SECTION_HEADING.findall(cell.source):
                current = (int(number), title.strip())
        out.append(current)
    return out


def resolve(ref: str, titles: dict[int, str], where: str) -> int:
    """The section number of ``N · start of title`` (or 0 for the opening cells), checked against the notebook."""
    if ref == OPENING:
        return 0
    match = SECTION_REF.match(ref)
    if not match:
        raise ValueError(f"{where}: section {ref!r} is neither {OPENING!r} nor 'N · start of its title'")
    number, start = int(match[1]), match[2].strip()
    if number not in titles:
        raise ValueError(f"{where}: section {number} does not exist; the notebook has {sorted(titles)}")
    if not titles[number].startswith(start):
        raise ValueError(f"{where}: section {number} is {titles[number]!r}, not {start!r}...")
    return number


def selection(row: dict, prefix: str) -> tuple[Path, set[int] | None]:
    """The notebook a row names and the section numbers it runs (None: the whole notebook)."""
    path = notebook_path(prefix)
    where = f"schedule {row['name']!r}, notebook {path.name}"
    if row["teach"] == [ALL]:
        if row["setup"]:
            raise ValueError(f"{where}: teaches all, so it has nothing to run first; got {row['setup']}")
        return path, None
    titles = dict(sections(nbformat.read(path, as_version=4)))
    return path, {resolve(ref, titles, where) for ref in row["setup"] + row["teach"]}


ROWS = parse_schedules(GUIDE.read_text(encoding="utf-8"))
PARTS = [(row, prefix) for row in ROWS for prefix in row["notebooks"]]
SUBSETS = [(row, prefix) for row, prefix in PARTS if row["teach"] != [ALL]]


def _id(part):
    row, prefix = part
    return f"{row['name']}-{prefix}"


@pytest.mark.parametrize("part", PARTS, ids=_id)
def test_every_section_a_schedule_names_exists(part):
    row, prefix = part
    path, chosen = selection(row, prefix)
    whole = chosen is None or chosen == {s for s, _ in sections(nbformat.read(path, as_version=4))}
    assert row["run_by"] == (BY_NBVAL if whole else BY_TEST), (
        f"schedule {row['name']!r}: 'run by' says {row['run_by']!r}; it runs "
        f"{'the whole' if whole else 'part of'} {path.name}, so it should say {BY_NBVAL if whole else BY_TEST!r}")


def test_nbval_runs_every_whole_notebook_a_schedule_names():
    makefile = (ROOT / "Makefile").read_text()
    pattern = re.search(r"^NOTEBOOKS := \$\(sort \$\(wildcard (\S+)\)\)$", makefile, re.MULTILINE)
    assert pattern, "the Makefile's NOTEBOOKS line changed: check that nbval still runs every lesson"
    assert re.search(r"^test: .*\bnbval\b", makefile, re.MULTILINE), "`make test` no longer runs nbval"
    covered = set(ROOT.glob(pattern[1]))
    for row, prefix in PARTS:
        if row["teach"] == [ALL]:
            assert notebook_path(prefix) in covered, f"{row['name']!r}: nbval does not run {prefix}"


def test_the_table_parser_rejects_what_it_cannot_check():
    with pytest.raises(ValueError, match="once"):
        parse_schedules("no table here")
    nb = nbformat.read(notebook_path("02"), as_version=4)
    titles = dict(sections(nb))
    assert resolve(OPENING, titles, "x") == 0 and titles[0] == OPENING
    assert resolve("8 · Lab", titles, "x") == 8
    with pytest.raises(ValueError, match="section 8 is"):
        resolve("8 · Results", titles, "x")
    with pytest.raises(ValueError, match="does not exist"):
        resolve("99 · Lab", titles, "x")


def subset_notebook(path: Path, chosen: set[int]):
    """The notebook of exactly the cells of the chosen sections, in order; each keeps its origin in metadata."""
    nb = nbformat.read(path, as_version=4)
    kept = []
    for index, (cell, (number, title)) in enumerate(zip(nb.cells, sections(nb))):
        if number in chosen:
            cell.metadata["schedule_origin"] = {"index": index, "section": f"{number} · {title}"}
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
            kept.append(cell)
    nb.cells = kept
    return nb


@pytest.mark.teacher
@pytest.mark.parametrize("part", SUBSETS, ids=_id)
def test_schedule_runs_top_to_bottom_in_the_smoke_profile(part, tmp_path, monkeypatch):
    row, prefix = part
    path, chosen = selection(row, prefix)
    nb = subset_notebook(path, chosen)
    # the environment of `make test`'s nbval run: smoke profile, no unit-test defaults from conftest.py
    monkeypatch.setenv("DISTILL_LAB_PROFILE", "smoke")
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv(REPORT_ENV, str(tmp_path / "reports"))
    monkeypatch.delenv("DISTILL_LAB_BF16", raising=False)
    monkeypatch.delenv("DISTILL_LAB_KERNELS", raising=False)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute(env=kernel_env())
    except CellExecutionError as err:
        failed = next((c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                      None)
        origin = failed.metadata["schedule_origin"] if failed is not None else {"index": "?", "section": "?"}
        cell_id = failed.get("id", "?") if failed is not None else "?"
        pytest.fail(f"schedule {row['name']!r}: {path.name} cell {origin['index']} (id {cell_id}, section "
                    f"{origin['section']}) fails when the schedule runs it:\n{err}", pytrace=False)
