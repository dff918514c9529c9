"""Committed notebooks show every knob without a kernel: saved widget state, and the default figure after it.

These read the notebook JSON only. They pass on notebooks executed by ``make run`` (``distill_lab.course``
stores the widget state) after the widget cells were followed by their default-figure cells.
"""

import re

import nbformat
import pytest

from distill_lab.course import find_notebooks

BUILDERS = re.compile(r"\b(temperature_widget|distillation_widget|quantization_widget|sparsity_widget|"
                      r"layer_pruning_widget|recipe_panel)\(")
VIEW = "application/vnd.jupyter.widget-view+json"
STATE = "application/vnd.jupyter.widget-state+json"


def _widget_cells(nb):
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and BUILDERS.search(c.source)
            and not c.source.lstrip().startswith("def ")]


@pytest.mark.parametrize("path", find_notebooks(), ids=lambda p: p.stem)
def test_each_knob_has_saved_state_and_a_default_figure(path):
    nb = nbformat.read(path, as_version=4)
    cells = _widget_cells(nb)
    assert cells, f"{path.name}: no widget cell found"
    state = nb.metadata.get("widgets", {}).get(STATE, {}).get("state", {})
    for i in cells:
        views = [o["data"][VIEW]["model_id"] for o in nb.cells[i].get("outputs", []) if VIEW in o.get("data", {})]
        assert views, f"{path.name} cell {i}: no widget view output (execute the notebook)"
        for model_id in views:
            assert model_id in state, f"{path.name} cell {i}: widget {model_id} has no saved state"
            children = state[model_id]["state"].get("children", [])
            assert children and all(c.removeprefix("IPY_MODEL_") in state for c in children), \
                f"{path.name} cell {i}: the widget's controls are not all in the saved state"
            kids = [state[c.removeprefix("IPY_MODEL_")] for c in children]
            outputs = [k["state"].get("outputs", []) for k in kids if k["model_name"] == "OutputModel"]
            if not any(k["model_name"] == "ButtonModel" for k in kids):  # a Run button draws only when clicked
                assert outputs and any("image/png" in o.get("data", {}) for o in outputs[0]), \
                    f"{path.name} cell {i}: the widget's saved Output holds no figure"
        following = next((c for c in nb.cells[i + 1:] if c.cell_type == "code"), None)
        assert following is not None and any("image/png" in o.get("data", {}) for o in following.get("outputs", [])), \
            f"{path.name} cell {i}: the next code cell shows no image (the knobs' default figure)"
