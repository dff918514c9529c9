"""benchmarks/run_times.py: the course maps' run times are the committed notebooks' own cell timings."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_times", ROOT / "benchmarks" / "run_times.py")
run_times = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_times)


def _cell(start: str, reply: str, output: str = "") -> dict:
    return {"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": output}],
            "metadata": {"execution": {"iopub.execute_input": start, "shell.execute_reply": reply}}}


NB = {"cells": [{"cell_type": "markdown", "source": "# title"},
                _cell("2026-12-07T12:53:39.000Z", "2026-12-07T12:53:43.000Z",
                      "profile: laptop | device: cpu | torch threads: 2\n"),
                _cell("2026-12-07T12:53:44.000Z", "2026-12-07T12:57:21.000Z", "CPU:        AMD EPYC\n")]}

MAP = """intro, 9.9 min stays

<!-- run-times: written by benchmarks/run_times.py -->

| notebook | what | study time | run time* |
|---|---|---|---|
| `00_a.ipynb` | 1.0 min of reading | ≈ 40 min | 1.0 min (0.9 the run before) |
| **01 · B** | b | ≈ 60 min | 2.0 min |

\\*Run time: old text.

<!-- /run-times -->
after, 9.9 min stays
"""


def _runs(minutes=(3.7, 10.7)):
    return {f"0{i}": {"minutes": m, "date": "2026-12-07", "profile": "laptop", "threads": "2", "cpu": "AMD EPYC",
                      "amx": False} for i, m in enumerate(minutes)}


def test_the_course_maps_agree_with_the_committed_notebooks():
    stale = run_times.write_targets(ROOT, write=False)
    assert not stale, f"{stale} differ from the notebooks' cell timings: run python benchmarks/run_times.py --write"


def test_run_time_is_the_last_reply_minus_the_first_start():
    minutes, first, last = run_times.run_time(NB)
    assert minutes == pytest.approx(222 / 60)
    assert (first.isoformat(), last.isoformat()) == ("2026-12-07T12:53:39+00:00", "2026-12-07T12:57:21+00:00")


def test_a_code_cell_without_timing_is_an_error():
    nb = copy.deepcopy(NB)
    del nb["cells"][2]["metadata"]["execution"]
    with pytest.raises(ValueError, match="00_x.ipynb cell 2 has no execution timing"):
        run_times.run_time(nb, "00_x.ipynb")


def test_notebook_runs_read_profile_threads_cpu_and_date(tmp_path):
    (tmp_path / "00_a.ipynb").write_text(json.dumps(NB))
    later = copy.deepcopy(NB)
    later["cells"][2]["metadata"]["execution"]["shell.execute_reply"] = "2026-12-07T13:03:39.000Z"
    del later["cells"][2]["outputs"][0]["text"]
    (tmp_path / "01_b.ipynb").write_text(json.dumps(later))
    runs = run_times.notebook_runs(tmp_path)
    assert {nb: round(run["minutes"], 1) for nb, run in runs.items()} == {"00": 3.7, "01": 10.0}
    assert runs["00"]["cpu"] == "AMD EPYC" and runs["01"]["cpu"] is None
    assert {runs["01"]["profile"], runs["01"]["threads"], runs["01"]["date"]} == {"laptop", "2", "2026-12-07"}
    assert "executed 2026-12-07 on AMD EPYC (the CPU as 00 prints it)" in run_times.footnote(runs)


def test_rewrite_writes_only_the_run_time_column_and_the_footnote():
    new = run_times.rewrite(MAP, _runs())
    assert "| `00_a.ipynb` | 1.0 min of reading | ≈ 40 min | 3.7 min |" in new
    assert "| **01 · B** | b | ≈ 60 min | 10.7 min |" in new
    assert "old text" not in new and "0.9 the run before" not in new
    assert "laptop profile, 2 torch threads, executed 2026-12-07 on AMD EPYC without AMX" in new
    assert new.startswith("intro, 9.9 min stays\n") and new.endswith("<!-- /run-times -->\nafter, 9.9 min stays\n")
    assert run_times.rewrite(new, _runs()) == new  # written once, nothing left to change
    assert "| 3.8 min |" in run_times.rewrite(new, _runs((3.75, 10.7)))


@pytest.mark.parametrize("text, message", [
    ("no markers at all", "has no <!-- run-times"),
    (MAP.replace("| **01 · B**", "| **B**"), "names no notebook"),
    (MAP.replace("run time*", "minutes"), "no column whose header starts with 'run time'"),
])
def test_a_course_map_it_cannot_read_is_an_error(text, message):
    with pytest.raises(ValueError, match=message):
        run_times.rewrite(text, _runs(), "MAP.md")
