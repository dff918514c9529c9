"""distill_lab.course: headless execution helpers (no notebook is executed here)."""

import nbformat

from distill_lab.course import find_notebooks, results_markdown, strip_progress_bars


def _widget(text):
    return nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": text})


def test_strip_progress_bars_keeps_knobs_and_text():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [_widget("perplexity:   0%|          | 0/5 [00:00<?, ?it/s]"),
                    _widget("interactive(children=(FloatSlider(value=1.0),))"),
                    nbformat.v4.new_output("stream", name="stdout", text="50%|## not a widget\n"),
                    _widget("recipe prune-qat:  50%|#####     | 1/2 [00:00<?, ?step/s]")]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("# title")])
    assert strip_progress_bars(nb) == 2
    assert [o.get("output_type") for o in cell.outputs] == ["display_data", "stream"]
    assert "interactive" in cell.outputs[0]["data"]["text/plain"]


def test_find_notebooks_in_lesson_order_and_markdown_report():
    names = [p.name for p in find_notebooks()]
    assert names == sorted(names) and names[0].startswith("00_") and len(names) >= 5
    md = results_markdown({"00_baseline": {"metrics": {"ppl": {"pydoc": 15.71}}}}, "laptop",
                          {"device": "cpu", "cpu_threads": 2, "torch": "2", "transformers": "5",
                           "git_commit": "abc", "time_utc": "now"}, {"00_baseline": 12.0})
    assert "| ppl.pydoc | 15.71 |" in md and "| 00_baseline | 12 |" in md


def test_headless_run_captures_figures_even_under_agg(tmp_path, monkeypatch):
    """The course runner executes with the inline backend, so a plot becomes an image/png output."""
    from distill_lab.course import INLINE_BACKEND, execute_notebook, kernel_env

    monkeypatch.setenv("MPLBACKEND", "agg")  # what CI and the nbval target set
    assert kernel_env()["MPLBACKEND"] == INLINE_BACKEND
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4]);"),
        nbformat.v4.new_code_cell("print('no figure here')")])
    src = tmp_path / "fig.ipynb"
    nbformat.write(nb, src)
    execute_notebook(src, tmp_path / "out.ipynb", timeout=120)
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    kinds = [[k for o in c.outputs for k in o.get("data", {})] for c in done.cells]
    assert "image/png" in kinds[0] and "image/png" not in kinds[1]
