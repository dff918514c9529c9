"""Held-out choices: lesson 01's recipe is chosen on validation prompts and reported on held-out ones.

benchmarks/distill_levers.py chooses (validation windows, VALIDATION_PROMPTS); notebook 01 reports (test
windows, HELD_OUT_PROMPTS); every band of lesson 01 states its basis (issue 30).
"""

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from distill_lab.data import HELD_OUT_PROMPTS, VALIDATION_PROMPTS
from distill_lab.profiles import LESSONS

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [ROOT / "notebooks" / "01_distillation.ipynb", ROOT / "notebooks" / "student" / "01_distillation.ipynb"]


def _bench():
    spec = importlib.util.spec_from_file_location("distill_levers", ROOT / "benchmarks" / "distill_levers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cells(path, kind):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def test_validation_and_held_out_prompts_are_disjoint():
    val, held = [p.strip().lower() for p in VALIDATION_PROMPTS], [p.strip().lower() for p in HELD_OUT_PROMPTS]
    assert len(set(val)) == len(val) >= 2 and len(set(held)) == len(held) >= 6
    overlap = [(v, h) for v in val for h in held if v.startswith(h) or h.startswith(v)]
    assert not overlap, f"a held-out prompt is (a prefix of) a validation prompt: {overlap}"
    # the two prompts the recipe was first picked on are validation prompts now, not reported ones
    assert {"The try statement specifies", "A list comprehension consists of"} <= set(VALIDATION_PROMPTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.parent.name + "/" + p.name)
def test_lesson_01_reports_on_held_out_prompts(path):
    code = _cells(path, "code")
    gen = [c for c in code if "generate_continuations" in c and "repeated_ngram_share" in c]
    assert len(gen) == 1, f"{path.name}: expected one cell that generates and scores continuations, got {len(gen)}"
    tree = ast.parse(gen[0])
    sources = {ast.unparse(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "prompts" for t in node.targets)}
    assert sources == {"list(HELD_OUT_PROMPTS)[:SIZES['held_out']]"}, f"{path.name}: prompts come from {sources}"
    # the smoke profile scores a few of them (CI time); every other profile reports on all of them
    for name, lesson in LESSONS["01"].items():
        if name != "smoke":
            assert lesson["sizes"]["held_out"] == len(HELD_OUT_PROMPTS), name
    loops = [ast.unparse(node.iter) for node in ast.walk(tree) if isinstance(node, ast.For)]
    assert "prompts" in loops, f"{path.name}: the continuations loop over {loops}, not the held-out prompts"
    leaked = [p for p in VALIDATION_PROMPTS if any(p in c for c in code)]
    assert not leaked, f"{path.name}: validation prompts written into the lesson's code: {leaked}"
    assert any("VALIDATION_PROMPTS" in m for m in _cells(path, "markdown")), "the prose must name the choice's prompts"


def test_benchmark_chooses_on_validation_and_reports_held_out():
    bench = _bench()
    assert bench.VALIDATION_PROMPTS is VALIDATION_PROMPTS and bench.HELD_OUT_PROMPTS is HELD_OUT_PROMPTS
    assert bench.LESSON_RECIPE in bench.CANDIDATES
    assert "01's student, CE only" not in bench.CANDIDATES and "01's student, untrained" not in bench.CANDIDATES
    src = (ROOT / "benchmarks" / "distill_levers.py").read_text()
    assert 'corpus_windows("pydoc", "validation"' in src
    bands = {"ppl_ratio": 2.0, "rep4": 0.2}
    # only the validation measures exist: choose() cannot read test windows or held-out prompts
    scores = {"a": {"val_ratio": 1.3, "val_pass": 7}, "b": {"val_ratio": 1.1, "val_pass": 5},
              "c": {"val_ratio": 2.5, "val_pass": 12}, "d": {"val_ratio": 1.2, "val_pass": 7}}
    assert bench.choose(scores, bands) == "d"  # most passes within the band; ties to the lower ratio
    assert bench.choose({k: scores[k] for k in "ab"}, bands) == "a"
    with pytest.raises(ValueError, match=r"no row within the validation perplexity band \(2.0\).*'c': 2.5"):
        bench.choose({"c": scores["c"]}, bands)


def test_lesson_01_bands_state_their_basis():
    for name, lesson in LESSONS["01"].items():
        basis = lesson["basis"]
        assert set(basis) == set(lesson["bands"]), f"{name}: bands without a basis: {set(lesson['bands']) - set(basis)}"
        for key, text in basis.items():
            stated = "claim" in text or ("earlier" in text and "run" in text and "margin" in text)
            assert stated, f"{name} {key}: {text!r} names neither the claim nor an earlier run plus a margin"
