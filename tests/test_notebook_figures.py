"""The committed notebooks: every code cell that draws a figure carries it as an image/png output,
and no markdown cell uses words from outside the course ("seed", "design notes").

A code cell *draws a figure* when, outside any ``def``/``lambda`` body, it calls
  * a package plot helper ``plot_<name>(...)`` (``distill_lab.plotting``), or
  * pyplot ``plt.<name>(...)``, or
  * an axes drawing method ``.plot / .bar / .barh / .scatter / .hist / .step(...)``.
Cells that build a widget (a call of ``<name>_widget(...)`` or ``recipe_panel(...)``) are left out:
their figures live in the widget's output area, which is saved as widget state, not as a cell image.
Calls inside a function body do not count, because defining a function draws nothing.

This test reads the committed outputs. They are written by the laptop-profile run of every
notebook (``make run`` / ``python -m distill_lab course``), so it fails on notebooks executed
with ``MPLBACKEND=agg``, which never emit an image.
"""

import ast
import re

import nbformat
import pytest

from distill_lab.course import find_notebooks

DRAW_METHODS = {"plot", "bar", "barh", "scatter", "hist", "step"}
WIDGET_CALL = re.compile(r"\b(\w+_widget|recipe_panel)\(")
OUTSIDE_WORDS = re.compile(r"\bseed\b|\bseed's\b|design notes", re.IGNORECASE)


def _called_names(source: str) -> list[str]:
    """Names of the functions and methods called at the top level of a cell (not inside a def/lambda)."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    names = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                names.append(f.id)
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                names.append(f"{owner}.{f.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def draws_figure(source: str) -> bool:
    """True when a code cell draws a figure, by the rule in this module's docstring."""
    if WIDGET_CALL.search(source):
        return False
    for name in _called_names(source):
        owner, _, attr = name.rpartition(".")
        if (not owner and name.startswith("plot_")) or owner == "plt" or (
                "." in name and attr in DRAW_METHODS):
            return True
    return False


def test_the_rule_on_examples():
    assert draws_figure("fig = plot_quantization_view(view)")
    assert draws_figure("fig, ax = plt.subplots()\nax.bar(x, y)")
    assert draws_figure("for a in axes:\n    a.plot([1, 2])")
    assert not draws_figure("import matplotlib.pyplot as plt\nfrom distill_lab.plotting import plot_bars")
    assert not draws_figure("def show(res):\n    plot_recipe_steps(res.rows())\n    plt.show()")
    assert not draws_figure("# NBVAL_IGNORE_OUTPUT\ntemperature_widget(logits, tokenizer, k=10)")
    assert not draws_figure("print(table.markdown())")


NOTEBOOKS = find_notebooks()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_cell_has_an_image(path):
    nb = nbformat.read(path, as_version=4)
    figure_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and draws_figure(c.source)]
    assert figure_cells, f"{path.name}: a lesson without a single figure"
    missing = [i for i in figure_cells
               if not any("image/png" in o.get("data", {}) for o in nb.cells[i].get("outputs", []))]
    assert not missing, (f"{path.name}: code cells {missing} draw a figure but carry no image/png output; "
                         "re-execute the notebook with the course runner (python -m distill_lab course)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_uses_only_course_words(path):
    nb = nbformat.read(path, as_version=4)
    bad = [(i, m.group(0)) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
           for m in [OUTSIDE_WORDS.search(c.source)] if m]
    assert not bad, f"{path.name}: markdown cells use words from outside the course: {bad}"
