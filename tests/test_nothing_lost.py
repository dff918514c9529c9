"""Issue 28: nothing lost, round two (a user's notes, a measured report, a tied head's bias, NaN, sizes).

One test (or a few) per finding, on tiny random models; each fails on the code the issue probed (2c49872).
Finding 1 (the student generator) is tested in test_student.py.
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from distill_lab.__main__ import main
from distill_lab.models import tiny_llama
from distill_lab.pipeline import Recipe, run_recipe
from distill_lab.profiles import get_profile

PROFILE = dataclasses.replace(get_profile("smoke"), seq_len=32, eval_windows=4, batch_size=4,
                              train_steps=2, train_batch_size=2, calib_windows=2, latency_batch=1,
                              latency_seq=16, decode_tokens=2, repeats=1, recipe_steps=2, recipe_batch=2)


def _windows(n, seed, vocab=256, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g)


@pytest.fixture
def data():
    return {"windows": {"pydoc": _windows(4, 1), "stdlib-code": _windows(4, 2)}, "train_windows": _windows(8, 3)}


def _run(teacher, recipe, out, data, **kw):
    return run_recipe(teacher, None, recipe, out, profile=PROFILE, progress=False, **kw, **data)


def _one_line_err(capsys):
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _recipe(tmp_path, text="name: r\nsteps:\n  - quantize: {method: int8}\n", name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _export(folder):
    """A folder as compress exports it: weights, config, compression.json and the export manifest."""
    from distill_lab._fs import write_manifest

    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "compression.json").write_text("{}")
    write_manifest(folder, kind="export")
    return folder


# -- 2. compress --overwrite replaces an export only while it holds just what compress wrote -----

def test_finding2_overwrite_refuses_an_export_holding_a_users_files(tmp_path, capsys):
    out = _export(tmp_path / "o")
    (out / "MY_NOTES.md").write_text("notes")
    (out / "plots").mkdir()
    args = ["compress", "--recipe", _recipe(tmp_path), "--out", str(out), "--teacher", str(tmp_path / "nope"),
            "--profile", "smoke", "--quiet", "--overwrite"]
    assert main(args) == 2
    err = _one_line_err(capsys)
    assert "MY_NOTES.md" in err and "plots/" in err and "refusing" in err
    assert (out / "MY_NOTES.md").read_text() == "notes" and (out / "plots").is_dir()
    (out / "MY_NOTES.md").unlink()
    (out / "plots").rmdir()
    (out / "config.json").write_text('{"my": "edit"}')  # a changed file is the user's too
    assert main(args) == 2 and "config.json (changed)" in _one_line_err(capsys)
    (out / "config.json").write_text("{}")
    assert main(args) == 2 and "does not exist" in _one_line_err(capsys)  # accepted; stops at the missing teacher
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_finding2_saving_over_an_earlier_save_keeps_files_added_to_it(tmp_path):
    from distill_lab.quantization import Int8WeightOnlyConfig, quantize_, save_quantized

    model = tiny_llama(num_layers=1, seed=0)
    quantize_(model, Int8WeightOnlyConfig())
    ours = tmp_path / "ours"
    save_quantized(model, ours)
    save_quantized(model, ours)  # our own earlier save, untouched: replaced
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_quantized(model, ours)
    assert (ours / "notes.txt").read_text() == "mine"


# -- 3. --work gets the --out rules: only a folder run_recipe wrote, and nothing added to it ------

def test_finding3_work_holding_a_users_recipe_is_refused_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "small"
    tiny_llama(num_layers=1).save_pretrained(src)  # a teacher that loads: the old code got as far as rewriting
    capsys.readouterr()
    here = tmp_path / "project"
    here.mkdir()
    text = "# my recipe, with my comments\nname: r\nsteps:\n  - quantize: {method: int8}  # int8 first\n"
    recipe = _recipe(here, text, "recipe.yaml")
    (here / "result.json").write_text('{"mine": 1}')
    rc = main(["compress", "--recipe", recipe, "--out", str(tmp_path / "o"), "--work", str(here),
               "--teacher", str(src), "--profile", "smoke", "--quiet"])
    err = _one_line_err(capsys)
    assert rc == 2 and "recipe.yaml" in err and "result.json" in err and "--work" in err
    assert Path(recipe).read_text() == text and (here / "result.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in here.iterdir()) == ["recipe.yaml", "result.json"]
    # --out inside --work is refused as well (the export would become a stranger in the work folder)
    rc = main(["compress", "--recipe", recipe, "--out", str(here / "o"), "--work", str(here),
               "--teacher", str(src), "--profile", "smoke", "--quiet"])
    assert rc == 2 and "inside one another" in _one_line_err(capsys)


def test_finding3_stale_step_cleanup_never_removes_a_users_folder(tmp_path, data):
    work = tmp_path / "w"
    _run(tiny_llama(), Recipe("r", [{"quantize": {"method": "int8", "embedding_bits": None}}]), work, data)
    notes = work / "steps" / "02_notes"
    notes.mkdir()
    (notes / "n.txt").write_text("mine")
    other = Recipe("r", [{"quantize": {"method": "int8", "embedding_bits": 8}}])  # step 1 recomputed
    with pytest.raises(FileExistsError, match="steps/02_notes"):
        _run(tiny_llama(), other, work, data)
    assert (notes / "n.txt").read_text() == "mine"
    notes.joinpath("n.txt").unlink()
    notes.rmdir()
    (work / "recipe.yaml").write_text("# edited by me\n")  # a file it wrote, changed since: the user's now
    with pytest.raises(FileExistsError, match="recipe.yaml"):
        _run(tiny_llama(), other, work, data)
    assert (work / "recipe.yaml").read_text() == "# edited by me\n"


def test_finding3_a_work_folder_it_wrote_is_resumed_and_an_older_one_too(tmp_path, data):
    from distill_lab.pipeline.runner import WORK_MARKER

    work = tmp_path / "w"
    recipe = Recipe("r", [{"quantize": {"method": "int8", "embedding_bits": None}}])
    _run(tiny_llama(), recipe, work, data)
    assert _run(tiny_llama(), recipe, work, data).steps[0].resumed
    (work / WORK_MARKER).unlink()  # written by a version before the marker: steps/ and our names only
    assert _run(tiny_llama(), recipe, work, data).steps[0].resumed
    assert (work / WORK_MARKER).is_file()
