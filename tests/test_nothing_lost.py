"""Issue 28: nothing lost, round two (a user's notes, a measured report, a tied head's bias, NaN, sizes).

One test (or a few) per finding, on tiny random models; each fails on the code the issue probed (2c49872).
Finding 1 (the student generator) is tested in test_student.py, findings 6-8 in quantization/test_swaps.py.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from test_integrity import _one_line_err, _run, data  # noqa: F401 (data: the tiny windows fixture)

from distill_lab.__main__ import main
from distill_lab.models import tiny_llama
from distill_lab.pipeline import Recipe


def _recipe(tmp_path, text="name: r\nsteps:\n  - quantize: {format: int8}\n", name="r.yaml"):
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
    text = "# my recipe, with my comments\nname: r\nsteps:\n  - quantize: {format: int8}  # int8 first\n"
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
    _run(tiny_llama(), Recipe("r", [{"quantize": {"format": "int8", "embedding_bits": None}}]), work, data)
    notes = work / "steps" / "02_notes"
    notes.mkdir()
    (notes / "n.txt").write_text("mine")
    other = Recipe("r", [{"quantize": {"format": "int8", "embedding_bits": 8}}])  # step 1 recomputed
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
    from distill_lab.pipeline.workdir import WORK_MARKER

    work = tmp_path / "w"
    recipe = Recipe("r", [{"quantize": {"format": "int8", "embedding_bits": None}}])
    _run(tiny_llama(), recipe, work, data)
    assert _run(tiny_llama(), recipe, work, data).steps[0].resumed
    (work / WORK_MARKER).unlink()  # written by a version before the marker: steps/ and our names only
    assert _run(tiny_llama(), recipe, work, data).steps[0].resumed
    assert (work / WORK_MARKER).is_file()


# -- 4. course --out keeps an earlier report: dated, or replaced only with --overwrite --------------

LESSONS = [Path("00_first.ipynb"), Path("01_second.ipynb")]


@pytest.fixture
def fake_notebooks(monkeypatch):
    """course.execute_notebook without a kernel: writes the executed copy and the lesson's record."""
    from distill_lab import course

    calls = {"n": 0, "fail": None, "value": 1.0}

    def execute(path, out_path, timeout=3600):
        calls["n"] += 1
        if calls["fail"] == path.name:
            raise calls.get("error", RuntimeError("cell failed"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(f"executed {path.name} {calls['value']}")
        record = Path(os.environ[course.REPORT_ENV]) / "results" / f"{path.stem}.json"
        record.write_text(json.dumps({"metrics": {"ppl": calls["value"]}}))
        return 0.1

    monkeypatch.setattr(course, "execute_notebook", execute)
    return calls


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finding4_course_keeps_the_earlier_report_and_the_users_files(tmp_path, fake_notebooks, capsys):
    from distill_lab.course import run_course

    out = tmp_path / "reports"
    run_course(out, "smoke", LESSONS)
    (out / "results" / "mine.json").write_text('{"my": "numbers"}')  # a user's JSON among the records
    (out / "comparison.md").write_text("| the report command's table |")  # another command's file
    laptop = _snapshot(out)
    fake_notebooks["value"] = 2.0
    run_course(out, "smoke", LESSONS)  # `make run` again: the earlier report is kept under a dated name
    kept = [p for p in out.iterdir() if p.name.startswith("earlier-")]
    assert len(kept) == 1 and kept[0].name in capsys.readouterr().out
    assert (kept[0] / "results" / "mine.json").read_text() == '{"my": "numbers"}'
    assert (kept[0] / "results.json").read_bytes() == laptop["results.json"]
    assert (out / "comparison.md").read_bytes() == laptop["comparison.md"]
    assert json.loads((out / "results.json").read_text())["results"]["00_first"]["metrics"]["ppl"] == 2.0
    assert not (out / "results" / "mine.json").exists()  # moved with its report, not deleted


def test_finding4_overwrite_replaces_only_an_unchanged_report(tmp_path, fake_notebooks):
    from distill_lab.course import run_course

    out = tmp_path / "reports"
    run_course(out, "smoke", LESSONS)
    run_course(out, "smoke", LESSONS, overwrite=True)  # ours, unchanged: replaced, nothing dated
    assert not [p for p in out.iterdir() if p.name.startswith(("earlier-", ".tmp-dl-"))]
    (out / "results" / "mine.json").write_text("{}")
    ran = fake_notebooks["n"]
    with pytest.raises(FileExistsError, match="results/mine.json"):
        run_course(out, "smoke", LESSONS, overwrite=True)
    assert fake_notebooks["n"] == ran, "refused only after running the notebooks"
    assert (out / "results" / "mine.json").read_text() == "{}"


@pytest.mark.parametrize("error", [RuntimeError("cell failed"), KeyboardInterrupt()], ids=["failed", "ctrl-c"])
def test_finding4_a_failed_or_interrupted_run_leaves_the_report_as_it_was(tmp_path, fake_notebooks, error):
    from distill_lab.course import run_course

    out = tmp_path / "reports"
    run_course(out, "smoke", LESSONS)
    before = _snapshot(out)
    fake_notebooks.update(fail=LESSONS[1].name, error=error, value=3.0)
    with pytest.raises(type(error), match="unchanged"):
        run_course(out, "smoke", LESSONS)
    after = _snapshot(out)
    partial = [p for p in out.iterdir() if p.name.startswith("incomplete-")]
    assert len(partial) == 1
    assert (partial[0] / "notebooks" / LESSONS[0].name).read_text() == "executed 00_first.ipynb 3.0"
    assert {k: v for k, v in after.items() if not k.startswith("incomplete-")} == before


# -- 5. NaN is a failure everywhere: the quality guard, and the trainer ------------------------------

def _poison(model, config, ctx):
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("limit", [1.5, None])
def test_finding5_a_nan_model_fails_the_quality_guard_and_is_not_saved(tmp_path, data, scratch_steps, limit):
    from distill_lab.pipeline import QualityGuardError

    scratch_steps("poison", _poison)
    recipe = Recipe("nan", [{"poison": {}}], max_ppl_ratio=limit)
    with pytest.raises(QualityGuardError, match="not a finite number"):
        _run(tiny_llama(), recipe, tmp_path / "w", data)
    assert not list((tmp_path / "w" / "steps").glob("01_*")), "a NaN model was saved as a finished step"
    assert not (tmp_path / "w" / "result.json").exists()


def test_finding5_a_nan_topk_cache_stops_training_naming_the_step(tmp_path, data, capsys):
    import shutil

    from distill_lab.distillation import NonFiniteLossError, TeacherCache

    recipe = Recipe("kd", [{"distil": {"steps": 2, "batch_size": 2, "top_k": 4, "bf16": False}}])
    work = tmp_path / "w"
    _run(tiny_llama(), recipe, work, data)
    cache_path = next(work.glob("teacher_top4_*.safetensors"))
    cache = TeacherCache.load(cache_path)
    cache.values[:] = float("nan")
    cache.save(cache_path)
    shutil.rmtree(work / "steps")
    student = tiny_llama()
    with pytest.raises(NonFiniteLossError, match=r"step 1 of 2: the loss is nan"):
        _run(student, recipe, work, data)
    assert not (work / "steps" / "01_distil").exists(), "the NaN step was saved as finished"


def test_finding5_the_trainer_leaves_the_weights_of_the_last_good_step(data):
    from distill_lab.distillation import DistillationLoss, DistillationTrainer, NonFiniteLossError, TrainConfig

    student = tiny_llama(seed=3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = tiny_llama(seed=4)
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("inf")
    trainer = DistillationTrainer(student, data["train_windows"], teacher=teacher, loss=DistillationLoss(),
                                  config=TrainConfig(steps=3, batch_size=2, bf16=False, progress=False))
    with pytest.raises(NonFiniteLossError, match="step 1 of 3"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


# -- 11, 12, 13. strings and sizes have bounds, stated in the error ----------------------------------


def test_finding11_a_yaml_alias_bomb_and_a_non_string_description_are_refused_at_load(tmp_path):
    import time

    nested = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(2, 10))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a1: &a1 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + nested.replace(
        "a9: &a9", "description: &a9") + "steps:\n  - quantize: {format: int8}\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"more than 10000 values .*at most 10000"):
        Recipe.load(bomb)
    assert time.perf_counter() - start < 5
    for text, match in [("description: [not, a, string]\n", r"description=\['not', 'a', 'string'\]; allowed: a string"),
                        (f"description: {'x' * 1001}\n", "description=.*at most 1000 characters"),
                        (f"name: {'n' * 101}\n", "name=.*at most 100 characters")]:
        path = tmp_path / "r.yaml"
        path.write_text(text + "steps:\n  - quantize: {format: int8}\n")
        with pytest.raises(ValueError, match=match):
            Recipe.load(path)


@pytest.mark.parametrize("knob,limit", [("steps", "100,000"), ("batch_size", "1,024"), ("top_k", "4,096")])
@pytest.mark.parametrize("kind", ["distil", "qat"])
def test_finding12_absurd_training_sizes_are_refused_with_the_limit(kind, knob, limit):
    with pytest.raises(ValueError, match=rf"step '{kind}': {knob}=1000000000; allowed: null or an int from 1 to "
                                         rf"{limit}"):
        Recipe("r", [{kind: {knob: 10**9}}])
    Recipe("r", [{kind: {knob: int(limit.replace(",", ""))}}])  # the limit itself is allowed


def test_finding13_a_huge_intermediate_size_is_refused_before_allocating(tmp_path, capsys):
    import time

    from distill_lab.models import load_model

    tiny_llama().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 10**9
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"intermediate_size=1000000000 but .*(up|gate)_proj.weight has \d+ rows"):
        load_model(tmp_path / "m", device="cpu")
    assert time.perf_counter() - start < 5
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--profile", "smoke"]) == 2
    assert "intermediate_size=1000000000" in _one_line_err(capsys)


# -- 14. GGUF inputs: one line naming the file and what is wrong --------------------------------------

def _gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_finding14_crafted_gguf_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    import struct

    from distill_lab._fs import DamagedFileError
    from distill_lab.export import read_gguf_tensors
    from distill_lab.models import load_model

    good = _gguf(tmp_path / "good.gguf")
    crafted = {"truncated": good[:len(good) // 2], "magic": b"XXXX" + good[4:], "empty": b"",
               "tensor-count": good[:8] + struct.pack("<Q", 10**6) + good[16:],
               "kv-count": good[:16] + struct.pack("<Q", 10**6) + good[24:]}
    for name, data in crafted.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(DamagedFileError, match=rf"GGUF file '{path}' is damaged or not a GGUF file"):
            read_gguf_tensors(path)
        with pytest.raises(DamagedFileError, match=rf"GGUF file '{path}'"):
            load_model(path, device="cpu")
        capsys.readouterr()
        assert main(["eval", str(path), "--profile", "smoke"]) == 2
        err = _one_line_err(capsys)
        assert str(path) in err and "does not exist" not in err, err
    # a well-formed GGUF that is no whole model: named, and not called missing
    assert main(["eval", str(tmp_path / "good.gguf"), "--profile", "smoke"]) == 2
    err = _one_line_err(capsys)
    assert "good.gguf' cannot be loaded as a causal LM" in err and "does not exist" not in err
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["eval", str(tmp_path / "notes.txt"), "--profile", "smoke"]) == 2
    assert "is a file; allowed: a model folder, a .gguf file" in _one_line_err(capsys)


def test_finding14_eval_reads_the_gguf_file_export_wrote(tmp_path, capsys):
    from transformers import AutoTokenizer

    from distill_lab.models import TEACHER_CACHE_NAME, cache_dir

    teacher_folder = cache_dir() / TEACHER_CACHE_NAME
    if not teacher_folder.is_dir():
        pytest.skip("teacher cache not built (the export copies the teacher's tokenizer)")
    llama = tmp_path / "llama"
    tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128).save_pretrained(llama)
    AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(llama)
    assert main(["export", str(llama), "--out", str(tmp_path / "l.gguf")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "l.gguf"), "--profile", "smoke"]) == 0
    assert "ppl pydoc" in capsys.readouterr().out


# -- 15. disk full and Ctrl-C give one plain line; leftovers go at the next run; export never eats its source

@pytest.mark.parametrize("error", [
    "copytree",  # shutil.Error: every file it could not copy, 1.6 KB of repr
    "gguf",  # numpy's tofile
    "enospc",
])
def test_finding15_a_full_disk_is_one_plain_line(monkeypatch, capsys, error):
    import errno
    import shutil

    import distill_lab.__main__ as cli

    errors = {"copytree": shutil.Error([(f"/src/{i}.safetensors", f"/out/.tmp-dl-1/m/{i}.safetensors",
                                         "[Errno 28] No space left on device") for i in range(20)]),
              "gguf": OSError("3342336 requested and 1875008 written"),
              "enospc": OSError(errno.ENOSPC, "No space left on device", "/out/result.json")}

    def fail(args):
        raise errors[error]

    monkeypatch.setattr(cli, "_cmd_compress", fail)
    assert main(["compress", "--recipe", "r.yaml", "--out", "o"]) == 2
    err = _one_line_err(capsys)
    assert "the disk is full" in err and len(err) < 300, err


def test_finding15_ctrl_c_during_course_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import nbclient

    from distill_lab import course

    class Stopped(nbclient.NotebookClient):
        def execute(self, **kwargs):  # what nbclient does on SIGINT: stops the kernel, the cell then fails
            self._async_cleanup_kernel_future = object()
            raise AssertionError

    monkeypatch.setattr(nbclient, "NotebookClient", Stopped)
    monkeypatch.setattr(course, "find_notebooks", lambda folder=None: [tmp_path / "00_x.ipynb"])
    import nbformat

    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), tmp_path / "00_x.ipynb")
    assert main(["course", "--out", str(tmp_path / "reports"), "--profile", "smoke"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ZMQError" not in err
    last = err.strip().splitlines()[-1]  # after the notebooks' progress bar
    assert last.startswith("distill-lab course: interrupted; the report in") and "unchanged" in last
    assert "finished steps" not in last


def test_finding15_eval_interrupted_does_not_talk_about_steps(monkeypatch, capsys):
    import distill_lab.__main__ as cli

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_eval", stop)
    assert main(["eval", "teacher"]) == 130
    err = _one_line_err(capsys)
    assert "interrupted; nothing was written" in err and "steps" not in err


def test_finding15_a_killed_runs_leftovers_on_this_machine_go_at_the_next_run(tmp_path):
    import subprocess
    import sys

    from distill_lab._fs import HOST_TAG, clean_stale_tmp

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    here = tmp_path / f".tmp-dl-{dead}-{HOST_TAG}-abc"  # a SIGKILLed teacher conversion, seconds ago
    (here / "inner").mkdir(parents=True)
    elsewhere = tmp_path / f".tmp-dl-{dead}-h00000000-abc"  # another machine sharing the folder: pid means nothing
    elsewhere.mkdir()
    older = tmp_path / f".tmp-dl-{dead}-xyz"  # an older distill_lab's name, no host: the age rule as before
    older.mkdir()
    assert clean_stale_tmp(tmp_path) == [here]
    assert elsewhere.is_dir() and older.is_dir()


def test_finding15_export_never_writes_into_the_model_it_exports(tmp_path, capsys):
    model = tmp_path / "o2"
    tiny_llama().save_pretrained(model)
    weights = (model / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", str(model), "--out", str(model / "model.safetensors"), "--overwrite"]) == 2
    assert "lies inside the model being exported" in _one_line_err(capsys)
    assert main(["export", str(model), "--out", str(model / "m.gguf")]) == 2
    assert "lies inside the model being exported" in _one_line_err(capsys)
    assert (model / "model.safetensors").read_bytes() == weights and not (model / "m.gguf").exists()
