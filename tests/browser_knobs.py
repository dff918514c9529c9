"""Real-browser check of the lessons' knobs: JupyterLab + headless Chromium (Selenium), smoke profile.

``make browser-test`` runs this script (it is not part of ``make test``). For each notebook it runs all
cells in JupyterLab, as a learner would, then moves every knob of every widget and asserts that

* the widget rendered as a widget (not as ``interactive(children=...`` text);
* its figure (a PNG in the widget's own Output) changed after the move;
* lesson 04's recipe panel shows exactly one complete figure (non-trivial size, axes drawn) after each of
  10 consecutive "Run recipe" clicks;
* no cell has an error output and JupyterLab's log console stays empty.

JupyterLab listens on 127.0.0.1 only, on a free port, with a random token, and serves a temporary copy
of ``notebooks/`` (its autosave never touches the repository). It is stopped by its own PID. Screenshots
of every widget before and after each move go to ``reports/browser/``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "reports" / "browser"
RECIPE_CLICKS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root_dir: Path, port: int, token: str, log) -> subprocess.Popen:
    env = dict(os.environ, DISTILL_LAB_PROFILE="smoke", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JUPYTER_RUNTIME_DIR=str(root_dir.parent / "runtime"))
    env.pop("MPLBACKEND", None)  # a learner's kernel: ipykernel's default (inline) backend
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.workspaces_dir={root_dir.parent / 'workspaces'}",
           f"--LabApp.user_settings_dir={root_dir.parent / 'settings'}"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}; see its log")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("JupyterLab did not answer within 120 s")


def stop(proc: subprocess.Popen) -> None:
    """Stop JupyterLab (and the kernels it started) by its own PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100",
                "--disable-gpu"):
        opts.add_argument(arg)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        opts.binary_location = chromium
    driver_path = shutil.which("chromedriver")
    return webdriver.Chrome(options=opts, service=Service(driver_path) if driver_path else None)


# JavaScript run in the page (JupyterLab exposes its app as window.jupyterapp with expose_app_in_browser)
JS_STATE = """
if (!window.jupyterapp || !window.jupyterapp.shell) return null;
const panel = window.jupyterapp.shell.currentWidget;
if (!panel || !panel.content || !panel.sessionContext || !panel.sessionContext.session) return null;
const cells = [];
const model = panel.content.model;
for (let i = 0; i < model.cells.length; i++) {
  const c = model.cells.get(i);
  if (c.type !== 'code') continue;
  cells.push({index: i, count: c.executionCount, outputs: c.outputs.toJSON().map(o => o.output_type),
              errors: c.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)});
}
return {status: panel.sessionContext.session.kernel ? panel.sessionContext.session.kernel.status : 'none',
        cells: cells};
"""

JS_LOG_COUNT = """
const reg = window.jupyterapp.pluginRegistry;
const plugins = reg && reg._plugins;
const data = plugins && plugins.get('@jupyterlab/logconsole-extension:plugin');
const registry = data && data.service;
if (!registry) return -1;
let n = 0; const texts = [];
for (const logger of registry.getLoggers()) {
  n += logger.length;
  for (let i = 0; i < logger.length; i++) {
    const m = logger.outputAreaModel.get(i).toJSON();
    texts.push(JSON.stringify(m).slice(0, 300));
  }
}
return {n: n, texts: texts};
"""


def wait_for(fn, timeout: float, what: str, poll: float = 0.5):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            value = fn()
        except StaleElementReferenceException:  # the output was redrawn under our feet: look again
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_all(driver, name: str, timeout: float) -> dict:
    """Run every cell of the open notebook and wait until each code cell has an execution count."""
    wait_for(lambda: (s := driver.execute_script(JS_STATE)) and s["status"] == "idle", 180, f"{name}'s kernel")
    time.sleep(2)  # the notebook's cells are rendered
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return true;")
    state = wait_for(lambda: (s := driver.execute_script(JS_STATE)) and s["status"] == "idle"
                     and all(c["count"] for c in s["cells"]) and s, timeout, f"{name} to run all cells", poll=2)
    time.sleep(1.0)  # let the last widget views attach
    return driver.execute_script(JS_STATE)


def log_messages(driver) -> dict:
    out = driver.execute_script(JS_LOG_COUNT)
    assert out != -1, "could not reach JupyterLab's log console registry"
    return out


def png_of(img) -> bytes:
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), f"not an inline PNG: {src[:60]}"
    return base64.b64decode(src.split(",", 1)[1])


def check_complete_figure(png: bytes, where: str) -> tuple[int, int]:
    """A complete figure: a sizeable image whose axes are drawn (long straight dark lines: the spines)."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("L")
    w, h = im.size
    assert w >= 300 and h >= 200, f"{where}: figure of {w}x{h} px is too small to be complete"
    px = im.load()
    dark_rows = sum(1 for y in range(h) if sum(px[x, y] < 120 for x in range(w)) > 0.3 * w)
    dark_cols = sum(1 for x in range(w) if sum(px[x, y] < 120 for y in range(h)) > 0.3 * h)
    assert dark_rows >= 1 and dark_cols >= 1, f"{where}: no axes drawn (dark rows {dark_rows}, columns {dark_cols})"
    return w, h


def widget_roots(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .widget-interact")


def images_in(root):
    from selenium.webdriver.common.by import By

    return root.find_elements(By.CSS_SELECTOR, ".widget-output img")


def shot(element, name: str, listing: list) -> None:
    path = SHOTS / f"{name}.png"
    element.screenshot(str(path))
    listing.append(str(path.relative_to(ROOT)))


def move(driver, knob, kind: str) -> str:
    """Move one control as a learner would; return what was done."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    if kind == "slider":
        handle = knob.find_element(By.CSS_SELECTOR, ".noUi-handle")
        track = knob.find_element(By.CSS_SELECTOR, ".noUi-target")
        offset = int(track.size["width"] * 0.2)
        left = handle.location["x"] - track.location["x"]
        if left + offset > track.size["width"]:
            offset = -offset
        ActionChains(driver).click_and_hold(handle).move_by_offset(offset, 0).release().perform()
        return f"dragged {offset:+d} px"
    if kind == "dropdown":
        select = Select(knob.find_element(By.TAG_NAME, "select"))
        current = select.first_selected_option.text
        other = next(o.text for o in select.options if o.text != current)
        select.select_by_visible_text(other)
        return f"picked {other!r}"
    knob.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    return "toggled"


def knobs_of(root):
    from selenium.webdriver.common.by import By

    found = []
    for el in root.find_elements(By.CSS_SELECTOR, ":scope > .widget-slider, :scope > .widget-dropdown, "
                                                  ":scope > .widget-checkbox"):
        classes = el.get_attribute("class")
        kind = "slider" if "widget-slider" in classes else "dropdown" if "widget-dropdown" in classes else "checkbox"
        label = " ".join(e.text for e in el.find_elements(By.CSS_SELECTOR, ".widget-label, .widget-label-basic")
                         if e.text) or kind
        found.append((el, kind, label))
    return found


def check_widgets(driver, stem: str, listing: list, report: dict) -> None:
    from selenium.webdriver.common.by import By

    roots = widget_roots(driver)
    assert roots, f"{stem}: no widget rendered as a widget"
    for w_i, root in enumerate(roots):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", root)
        knobs = knobs_of(root)
        assert knobs, f"{stem}: widget {w_i} has no controls"
        for el, kind, label in knobs:
            label_el = el.find_element(By.CSS_SELECTOR, ".widget-label")
            assert driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth + 1", label_el), \
                f"{stem}: the label {label!r} is cut"
            if kind == "slider":
                track = el.find_element(By.CSS_SELECTOR, ".noUi-target")
                assert track.size["width"] >= 400, f"{stem}: slider {label!r} track is {track.size['width']} px"
        buttons = root.find_elements(By.CSS_SELECTOR, ":scope > button")
        if buttons:  # the recipe panel: sliders draw nothing, "Run recipe" does
            check_recipe_panel(driver, stem, root, buttons[0], listing, report)
            continue
        for k_i, (el, kind, label) in enumerate(knobs):
            time.sleep(0.5)
            imgs = wait_for(lambda: (i := images_in(root)) and [png_of(e) for e in i], 120,
                            f"{stem}: the figure of widget {w_i}")
            assert len(imgs) == 1, f"{stem}: widget {w_i} shows {len(imgs)} figures"
            before = imgs[0]
            slug = f"{stem}_w{w_i}_{label.split()[0].lower()}"
            shot(root, f"{slug}_before", listing)
            t0 = time.perf_counter()
            what = move(driver, el, kind)

            def changed():
                now = images_in(root)
                return len(now) == 1 and now[0].get_attribute("complete") == "true" and png_of(now[0]) != before
            wait_for(changed, 120, f"{stem}: widget {w_i}'s figure to change after moving {label!r}", poll=0.1)
            seconds = time.perf_counter() - t0
            time.sleep(0.5)  # a second (half-built) figure would show up now
            after = wait_for(lambda: [png_of(e) for e in images_in(root)], 30, f"{stem}: the figure after the move")
            assert len(after) == 1, f"{stem}: {len(after)} figures after moving {label!r}"
            check_complete_figure(after[0], f"{stem} {label}")
            shot(root, f"{slug}_after", listing)
            report.setdefault(stem, []).append({"knob": label, "move": what, "redraw_s": round(seconds, 2)})
            print(f"  {stem} widget {w_i}: {label!r} {what}: redrawn in {seconds:.2f} s", flush=True)


def check_recipe_panel(driver, stem, root, button, listing, report) -> None:
    from selenium.common.exceptions import StaleElementReferenceException

    shot(root, f"{stem}_recipe_before", listing)
    for click in range(1, RECIPE_CLICKS + 1):
        old = images_in(root)
        t0 = time.perf_counter()
        button.click()

        def redrawn():
            try:
                if old:
                    old[0].get_attribute("src")  # raises once the old image is gone
                    return False
            except StaleElementReferenceException:
                pass
            now = images_in(root)
            return (button.is_enabled() and len(now) >= 1 and now[0].get_attribute("complete") == "true") and now
        imgs = wait_for(redrawn, 600, f"{stem}: a figure after click {click}", poll=0.2)
        time.sleep(0.5)  # anything drawn twice (or late) would show up now
        imgs = wait_for(lambda: [png_of(e) for e in images_in(root)], 30, f"{stem}: the figure after click {click}")
        assert len(imgs) == 1, f"{stem}: click {click}: {len(imgs)} figures in the output"
        w, h = check_complete_figure(imgs[0], f"{stem} click {click}")
        logged = log_messages(driver)
        assert logged["n"] == 0, f"{stem}: click {click}: the log console holds {logged['texts']}"
        seconds = time.perf_counter() - t0
        report.setdefault(stem, []).append({"knob": "Run recipe", "click": click, "figure_px": [w, h],
                                            "seconds": round(seconds, 2)})
        print(f"  {stem}: click {click}: one complete figure {w}x{h} px in {seconds:.1f} s", flush=True)
    shot(root, f"{stem}_recipe_after", listing)


DEMO_CELLS = [
    "import time\n\nimport torch\nfrom IPython.display import Markdown, display\n\n"
    "from distill_lab import widgets as W\nfrom distill_lab.plotting import plot_recipe_steps\n\n"
    "class Tok:\n    def decode(self, ids):\n        return f'token {ids[0]}'\n\n"
    "torch.manual_seed(0)\nx = torch.randn(256, 384)\nx[:, :6] *= 80  # loud input features",
    "W.temperature_widget(torch.randn(200) * 3, Tok(), k=10)",
    "W.distillation_widget(torch.randn(200), torch.randn(200) * 3, 5, Tok(), k=8)",
    "W.quantization_widget(torch.randn(64, 384), bits=4, granularity=64)",
    "W.layer_pruning_widget(torch.randn(96, 384), x, name='a random layer')",
    "def run(**knobs):  # stands in for run_recipe: some work, then rows to plot\n    time.sleep(1.0)\n"
    "    keep = knobs['layers_keep']\n"
    "    return [{'stage': s, 'ppl_ratio_pydoc': 1 + i / keep, 'ppl_ratio_stdlib-code': 1.2 + i / keep,\n"
    "             'size_bytes': (500 - 100 * i) * 2**20} for i, s in enumerate(['teacher', 'prune', 'distil', 'quantize'])]\n\n\n"
    "def show(rows, ax):\n    display(Markdown(f'{len(rows)} rows'))\n    return plot_recipe_steps(rows, ax=ax)\n\n\n"
    "W.recipe_panel(run, show)",
]


def demo_notebook(folder: Path) -> Path:
    """A scratch notebook with every widget builder on small data (seconds, not the lessons' minutes)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in DEMO_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "knobs_demo.ipynb"
    nbformat.write(nb, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", help="notebook stems (default: all)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per notebook to run all cells")
    ap.add_argument("--demo", action="store_true",
                    help="only a scratch notebook with every widget builder on small data (quick check)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its JupyterLab (finally)
    sys.path.insert(0, str(ROOT))
    from distill_lab.course import find_notebooks

    paths = [] if args.demo else [p for p in find_notebooks(ROOT / "notebooks")
                                  if not args.notebooks or p.stem in args.notebooks]
    SHOTS.mkdir(parents=True, exist_ok=True)
    for p in paths:  # only this run's notebooks: several runs may share the folder
        for old in SHOTS.glob(f"{p.stem}_*.png"):
            old.unlink()
    tag = "demo" if args.demo else "all" if not args.notebooks else "+".join(p.stem[:2] for p in paths)
    tmp = Path(tempfile.mkdtemp(prefix="distill-lab-browser-"))
    served = tmp / "root"
    (served / "notebooks").mkdir(parents=True)
    for p in paths:
        shutil.copy(p, served / "notebooks" / p.name)
    if args.demo:
        paths = [demo_notebook(served / "notebooks")]
        for old in SHOTS.glob("knobs_demo_*.png"):
            old.unlink()
    port, token = free_port(), secrets.token_hex(24)
    log = open(SHOTS / f"jupyterlab-{tag}.log", "w")
    lab = start_lab(served, port, token, log)
    print(f"JupyterLab pid {lab.pid} on 127.0.0.1:{port}", flush=True)
    listing, report, failures = [], {}, []
    driver = None
    try:
        driver = browser()
        for p in paths:
            start = time.perf_counter()
            print(f"{p.stem}: run all cells", flush=True)
            driver.get(f"http://127.0.0.1:{port}/lab/tree/notebooks/{p.name}?token={token}&reset")
            try:
                state = run_all(driver, p.stem, args.timeout)
                errors = [f"cell {c['index']}: {e}" for c in state["cells"] for e in c["errors"]]
                assert not errors, f"{p.stem}: error outputs: {errors}"
                logged = log_messages(driver)
                assert logged["n"] == 0, f"{p.stem}: the log console holds {logged['texts']}"
                check_widgets(driver, p.stem, listing, report)
                logged = log_messages(driver)
                assert logged["n"] == 0, f"{p.stem}: the log console holds {logged['texts']} after the knobs moved"
                print(f"{p.stem}: ok ({time.perf_counter() - start:.0f} s)", flush=True)
            except Exception as err:  # keep going: report every notebook
                failures.append(f"{p.stem}: {type(err).__name__}: {err}")
                print(f"{p.stem}: FAILED {err}", flush=True)
                driver.save_screenshot(str(SHOTS / f"{p.stem}_failure.png"))
            # leave without a "save changes?" prompt (the served copy is temporary), then stop its kernel
            driver.execute_script("const w = window.jupyterapp.shell.currentWidget; "
                                  "if (w && w.content && w.content.model) { w.content.model.dirty = false; }")
            for s in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/sessions?token={token}")):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/sessions/{s['id']}?token={token}",
                                             method="DELETE")
                urllib.request.urlopen(req)
    finally:
        if driver is not None:
            driver.quit()
        stop(lab)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    (SHOTS / f"report-{tag}.json").write_text(json.dumps({"failures": failures, "moves": report, "screenshots": listing},
                                                  indent=2))
    print("screenshots:\n  " + "\n  ".join(listing))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"browser test passed: {len(paths)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
