"""Issue 11: nothing lost, nothing silently wrong (output folders, saved models, caches, bad numbers).

One test (or a few) per finding of the issue; each reproduces the finding on tiny models.
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_lab import pipeline
from distill_lab.__main__ import main
from distill_lab.models import load_model, tiny_llama
from distill_lab.pipeline import Recipe, run_recipe
from distill_lab.serialization import load_saved, save_model
from distill_lab.profiles import get_profile

PROFILE = dataclasses.replace(get_profile("smoke"), seq_len=32, eval_windows=4, batch_size=4,
                              train_steps=2, train_batch_size=2, calib_windows=2, latency_batch=1,
                              latency_seq=16, decode_tokens=2, repeats=1, recipe_steps=2, recipe_batch=2)
ROOT = Path(__file__).resolve().parent.parent
MANIFEST_NAME = "distill_lab_manifest.json"


def write_manifest(folder, kind="model"):
    """The manifest distill_lab writes into saved folders (imported late: each test fails on its own on old code)."""
    from distill_lab._fs import write_manifest as write

    return write(folder, kind=kind)


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


def _recipe(tmp_path, text="name: r\nsteps:\n  - quantize: {format: int8}\n"):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- 1. compress --out never deletes what it did not write ---------------------------------------

def test_finding1_compress_refuses_a_non_empty_out_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a learner's notes")
    rc = main(["compress", "--recipe", _recipe(tmp_path), "--out", str(out), "--teacher", str(tmp_path / "nope"),
               "--profile", "smoke", "--quiet"])
    err = _one_line_err(capsys)
    assert rc == 2 and "refusing" in err and str(out) in err
    assert (out / "notes.txt").read_text() == "a learner's notes"
    # --overwrite does not make a folder of someone else's files replaceable
    rc = main(["compress", "--recipe", _recipe(tmp_path), "--out", str(out), "--teacher", str(tmp_path / "nope"),
               "--profile", "smoke", "--overwrite", "--quiet"])
    assert rc == 2 and "refusing" in _one_line_err(capsys) and (out / "notes.txt").is_file()
    # the current folder (`--out .`) is refused the same way
    cwd = os.getcwd()
    try:
        os.chdir(out)
        rc = main(["compress", "--recipe", _recipe(tmp_path), "--out", ".", "--teacher", str(tmp_path / "nope"),
                   "--profile", "smoke", "--quiet"])
    finally:
        os.chdir(cwd)
    assert rc == 2 and "refusing" in _one_line_err(capsys) and (out / "notes.txt").is_file()


def test_finding1_an_earlier_export_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    write_manifest(out, kind="export")  # what compress leaves in its export
    args = ["compress", "--recipe", _recipe(tmp_path), "--out", str(out), "--teacher", str(tmp_path / "nope"),
            "--profile", "smoke", "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in _one_line_err(capsys)
    assert main(args + ["--overwrite"]) == 2  # accepted; stops later, at the missing teacher
    assert "does not exist" in _one_line_err(capsys)
    assert (out / "model.safetensors").read_bytes() == b"x"  # a failed run leaves the old export alone


# -- 2. reused work is keyed by the input model ---------------------------------------------------

def test_finding2_a_sibling_step_from_another_input_model_is_not_adopted(tmp_path, data):
    recipe = Recipe("same", [{"quantize": {"format": "int8", "embedding_bits": None}}])
    a, b = tiny_llama(seed=1), tiny_llama(seed=2)
    res_a = _run(a, recipe, tmp_path / "runs" / "a", data)
    res_b = _run(b, recipe, tmp_path / "runs" / "b", data)
    model_b, _ = load_saved(res_b.final.folder)
    model_a, _ = load_saved(res_a.final.folder)
    w_b = model_b.model.layers[0].mlp.up_proj.dequantized_weight()
    assert not torch.allclose(w_b, model_a.model.layers[0].mlp.up_proj.dequantized_weight()), "A's model as B's"
    assert torch.allclose(w_b, b.model.layers[0].mlp.up_proj.weight, atol=0.02)
    assert not res_b.steps[0].resumed
    assert json.loads((Path(res_b.final.folder) / "step.json").read_text())["input"] == pipeline.model_digest(b)
    # the same input model still reuses its sibling's step
    res_c = _run(tiny_llama(seed=1), recipe, tmp_path / "runs" / "c", data)
    assert res_c.steps[0].resumed


def test_finding2_teacher_measurement_is_keyed_by_the_teacher(tmp_path, data):
    cache = tmp_path / "teacher.json"
    m1 = pipeline.teacher_metrics(tiny_llama(seed=1), None, PROFILE, data["windows"], cache=cache, progress=False)
    m2 = pipeline.teacher_metrics(tiny_llama(seed=2), None, PROFILE, data["windows"], cache=cache, progress=False)
    assert m1["ppl_pydoc"] != m2["ppl_pydoc"]


# -- 3. loads are complete or they fail -------------------------------------------------------------

def test_finding3_quantized_export_without_its_config_is_an_error(tmp_path):
    from distill_lab.quantization import Int8WeightOnlyConfig, quantize_, save_quantized

    model = tiny_llama()
    quantize_(model, Int8WeightOnlyConfig())
    save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "quantization_config.json").unlink()
    with pytest.raises(ValueError, match="quantization_config.json"):
        load_model(tmp_path / "q", device="cpu")
    with pytest.raises(ValueError, match="quantization_config.json"):
        load_saved(tmp_path / "q")


def test_finding3_hf_folder_missing_a_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"m'.*missing tensors.*layers\.1\.mlp\.down_proj\.weight"):
        load_model(tmp_path / "m", device="cpu")
    with pytest.raises(ValueError, match=r"missing tensors.*down_proj"):
        load_saved(tmp_path / "m")


def test_finding3_config_with_an_extra_layer_is_an_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"asks for 3 layers but the weights hold 2"):
        load_model(tmp_path / "m", device="cpu")


def test_finding3_a_changed_weight_file_fails_its_checksum(tmp_path):
    from distill_lab.pruning import load_sparse, save_sparse
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_, save_quantized

    model = tiny_llama()
    save_model(model, None, tmp_path / "f")
    q = tiny_llama()
    quantize_(q, Int4WeightOnlyConfig(group_size=32))
    save_quantized(q, tmp_path / "q")
    s = tiny_llama()
    with torch.no_grad():
        s.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    save_sparse(s, tmp_path / "s")
    for folder in ("f", "q", "s"):
        assert (tmp_path / folder / MANIFEST_NAME).is_file()
    load_sparse(tmp_path / "s")  # intact: loads
    for folder, loader in ((tmp_path / "f", load_saved), (tmp_path / "q", load_saved), (tmp_path / "s", load_sparse)):
        path = folder / "model.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF  # one flipped byte in the tensor data: still opens, wrong numbers
        path.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=r"model.safetensors fails its checksum"):
            loader(folder)


# -- 4. damaged state is rebuilt --------------------------------------------------------------------

def test_finding4_a_truncated_finished_step_is_rebuilt(tmp_path, data, scratch_steps, capsys):
    calls = []

    def scale(model, config, ctx):
        calls.append(1)
        with torch.no_grad():
            model.model.norm.weight.mul_(0.5)
        return model

    scratch_steps("scale", scale)
    teacher = tiny_llama()
    recipe = Recipe("heal", [{"scale": {}}])
    first = _run(teacher, recipe, tmp_path / "run", data)
    _truncate(Path(first.final.folder) / "model.safetensors")
    capsys.readouterr()
    again = _run(teacher, recipe, tmp_path / "run", data)
    assert len(calls) == 2 and not again.steps[0].resumed
    assert "damaged" in capsys.readouterr().err
    model, _ = load_saved(again.final.folder)
    assert torch.allclose(model.model.norm.weight, teacher.model.norm.weight * 0.5)
    # a corrupt step.json is rebuilt too
    (Path(again.final.folder) / "step.json").write_text("{not json")
    _run(teacher, recipe, tmp_path / "run", data)
    assert len(calls) == 3


def test_finding4_corrupt_teacher_json_and_truncated_topk_cache_are_rebuilt(tmp_path, data, capsys):
    teacher = tiny_llama()
    recipe = Recipe("kd", [{"distil": {"steps": 1, "batch_size": 2, "top_k": 4, "bf16": False}}])
    _run(teacher, recipe, tmp_path / "run", data)
    tops = list((tmp_path / "run").glob("teacher_top4_*.safetensors"))
    assert len(tops) == 1
    _truncate(tops[0])
    (tmp_path / "run" / "teacher.json").write_text('{"profile": ')
    shutil.rmtree(tmp_path / "run" / "steps")
    capsys.readouterr()
    result = _run(teacher, recipe, tmp_path / "run", data)
    err = capsys.readouterr().err
    assert "teacher.json" in err and "teacher_top4_" in err
    assert result.final.metrics["ppl_pydoc"] > 0
    from distill_lab.distillation import TeacherCache

    assert TeacherCache.load(tops[0]).k == 4  # rebuilt whole
    assert json.loads((tmp_path / "run" / "teacher.json").read_text())["profile"] == PROFILE.name


def test_finding4_topk_cache_is_keyed_by_the_teacher(tmp_path, data):
    recipe = Recipe("kd", [{"distil": {"steps": 1, "batch_size": 2, "top_k": 4, "bf16": False}}])
    _run(tiny_llama(seed=1), recipe, tmp_path / "a", data, cache_dir=tmp_path / "shared")
    _run(tiny_llama(seed=2), recipe, tmp_path / "b", data, cache_dir=tmp_path / "shared")
    assert len(list((tmp_path / "shared").glob("teacher_top4_*.safetensors"))) == 2


@pytest.mark.teacher
def test_finding4_damaged_teacher_cache_is_converted_again(tmp_path, monkeypatch, capsys):
    from distill_lab import models

    src = models.cache_dir() / models.TEACHER_CACHE_NAME
    models.load_teacher(device="cpu")  # make sure the shared cache exists
    cache = tmp_path / "cache"
    (cache / models.TEACHER_CACHE_NAME).mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            os.link(f, cache / models.TEACHER_CACHE_NAME / f.name)
    target = cache / models.TEACHER_CACHE_NAME
    with open(src / "model.safetensors", "rb") as fh:
        (target / "model.safetensors").write_bytes(fh.read(1 << 20))  # truncated
    monkeypatch.setenv("DISTILL_LAB_CACHE", str(cache))
    model, tok = models.load_teacher(device="cpu")
    assert "damaged" in capsys.readouterr().err
    assert (target / MANIFEST_NAME).is_file() and model.config.num_hidden_layers == 30
    # a cache that lost its config.json is converted again into the non-empty folder
    (target / "config.json").unlink()
    model, tok = models.load_teacher(device="cpu")
    assert (target / "config.json").is_file() and model.config.vocab_size == 49152


# -- 5. leftover .tmp-* folders are cleaned up --------------------------------------------------------

def _dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_finding5_stale_tmp_folders_of_dead_runs_are_removed(tmp_path, data, scratch_steps):
    scratch_steps("same", lambda model, config, ctx: model)
    steps = tmp_path / "run" / "steps"
    steps.mkdir(parents=True)
    old = time.time() - 3600
    stale = steps / f".tmp-dl-{_dead_pid()}-abc"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "model.safetensors").write_bytes(b"0" * 1000)
    live = steps / f".tmp-dl-{os.getppid()}-xyz"  # a live process's folder is left alone
    live.mkdir()
    mine = steps / ".tmp-user-notes"  # not distill_lab's prefix: never touched
    mine.mkdir()
    fresh = steps / f".tmp-dl-{_dead_pid()}-new"  # too young to be judged stale
    fresh.mkdir()
    for p in (stale, stale / "inner", live, mine):
        os.utime(p, (old, old))
    from distill_lab._fs import clean_stale_tmp

    assert clean_stale_tmp(steps) == [stale] and mine.is_dir()
    (stale / "inner").mkdir(parents=True)
    os.utime(stale, (old, old))
    # a user's folder in the work folder makes the run refuse it (issue 28); without it, the run cleans up
    with pytest.raises(FileExistsError, match=".tmp-user-notes"):
        _run(tiny_llama(), Recipe("t", [{"same": {}}]), tmp_path / "run", data)
    assert mine.is_dir() and stale.is_dir()
    mine.rmdir()
    _run(tiny_llama(), Recipe("t", [{"same": {}}]), tmp_path / "run", data)
    assert not stale.exists()
    assert live.is_dir() and fresh.is_dir()
    assert not [p for p in steps.iterdir() if p.name.startswith(".tmp-") and p not in (live, fresh)]


# -- 6. one --out, two runs: a lock; publishing is one atomic rename ---------------------------------

def test_finding6_second_run_into_the_same_out_stops_with_one_line(tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.distill-lab.lock", "a+") as held:  # what a first, still running compress holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = main(["compress", "--recipe", _recipe(tmp_path), "--out", str(out), "--teacher",
                   str(tmp_path / "nope"), "--profile", "smoke", "--quiet"])
    err = _one_line_err(capsys)
    assert rc == 2 and "another distill-lab run" in err


def test_finding6_replace_dir_swaps_a_complete_folder_in_one_step(tmp_path):
    from distill_lab._fs import make_tmp_dir, replace_dir

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.bin").write_bytes(b"old")
    src = make_tmp_dir(tmp_path)
    (src / "new.bin").write_bytes(b"new")
    replace_dir(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["new.bin"]
    assert not src.exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


# -- 7. bad numbers are refused -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finding7_nan_or_inf_weights_are_refused(bad):
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_, quantize_tensor

    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        quantize_tensor(w, 4, 32, symmetric=False)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight holds 1 NaN/Inf"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_finding7_a_constant_group_keeps_its_value(symmetric):
    from distill_lab.quantization import Int4WeightOnlyLinear, dequantize, quantize_tensor

    lin = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[2, :32] = 0.0123  # one constant group of 32
        lin.weight[5, 32:] = -3 / 256
    q = Int4WeightOnlyLinear.from_float(lin, group_size=32, symmetric=symmetric)
    w = q.dequantized_weight()
    for row, cols, value in ((2, slice(0, 32), 0.0123), (5, slice(32, 64), -3 / 256)):
        err = (w[row, cols] - value).abs().max().item()
        # asymmetric: the value survives the bf16 zero point; symmetric: only the bf16 scale rounds (2^-8)
        assert err <= (1e-3 if not symmetric else 2 ** -8) * abs(value), (row, err)
    t = torch.full((2, 32), 0.0123)
    assert torch.allclose(dequantize(quantize_tensor(t, 4, 32, symmetric=False)), t, rtol=1e-5)


def test_finding7_group_size_that_divides_no_layer_is_an_error(tmp_path, data, capsys):
    from distill_lab.pipeline import group_size_skips
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_
    from distill_lab.quantization.api import Reason

    with pytest.raises(ValueError, match=r"group_size=100 divides none"):
        quantize_(tiny_llama(), Int4WeightOnlyConfig(group_size=100))
    with pytest.raises(ValueError, match=r"group_size=100 divides none"):
        _run(tiny_llama(), Recipe("g", [{"quantize": {"format": "int4", "group_size": 100}}]), tmp_path / "g", data)
    # one that skips some layers is reported in the summary and printed without progress bars
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    summary = quantize_(tiny_llama(hidden_size=64, intermediate_size=128), Int4WeightOnlyConfig(group_size=128))
    assert any(why.reason is Reason.GROUP_SIZE and "group_size=128" in str(why)
               for why in summary.float_modules.values())
    capsys.readouterr()
    result = _run(model, Recipe("g", [{"quantize": {"format": "int4", "group_size": 128}}]), tmp_path / "h", data)
    err = capsys.readouterr().err
    assert "stayed in float" in err and "group_size" in err
    assert group_size_skips(result.final.extras)  # read back from the step's structured record


def test_finding7_labels_other_than_ids_and_minus_100_are_refused():
    from distill_lab.distillation import DistillationLoss

    loss = DistillationLoss(alpha=0.5)
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    ok = torch.tensor([[1, 2, -100], [3, 4, 9]])
    assert torch.isfinite(loss(s, t, ok))
    for bad in (-1, 10):
        labels = ok.clone()
        labels[0, 0] = bad
        with pytest.raises(ValueError, match=rf"labels hold 1 value\(s\) such as {bad}; allowed"):
            loss(s, t, labels)


# -- 8. a crafted config.json is refused before anything is built --------------------------------------

def test_finding8_huge_layer_count_is_refused_quickly(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = 20000
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"asks for 20000 layers"):
        load_model(tmp_path / "m", device="cpu")
    cfg["num_hidden_layers"], cfg["vocab_size"] = 2, 10**7
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vocab_size=10000000 but model.embed_tokens.weight has 256 rows"):
        load_model(tmp_path / "m", device="cpu")
    assert time.perf_counter() - start < 5
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--profile", "smoke"]) == 2
    assert "vocab_size=10000000" in _one_line_err(capsys)


# -- 9. one line, not a traceback ------------------------------------------------------------------------

def test_finding9_damaged_files_and_bad_paths_are_one_line_errors(tmp_path, capsys):
    from distill_lab.quantization import Int8WeightOnlyConfig, quantize_, save_quantized

    # a weight file that is not safetensors at all
    tiny_llama().save_pretrained(tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00" * 100)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "garbage"), "--profile", "smoke"]) == 2
    assert "model.safetensors" in _one_line_err(capsys)
    # a config that fails transformers' own validation
    tiny_llama().save_pretrained(tmp_path / "badcfg")
    cfg = json.loads((tmp_path / "badcfg" / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # 32 is not divisible by 5
    (tmp_path / "badcfg" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "badcfg"), "--profile", "smoke"]) == 2
    _one_line_err(capsys)
    # a quantized export whose module spec is damaged
    model = tiny_llama()
    quantize_(model, Int8WeightOnlyConfig())
    save_quantized(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(qc["modules"]))
    del qc["modules"][name]["kind"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"distill_lab": json.dumps(qc)})
    write_manifest(tmp_path / "q")
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"/q' is damaged.*KeyError"):
        load_model(tmp_path / "q", device="cpu")
    assert main(["eval", str(tmp_path / "q"), "--profile", "smoke"]) == 2
    assert "KeyError" in _one_line_err(capsys)
    # a recipe path that is a folder
    rc = main(["compress", "--recipe", str(tmp_path), "--out", str(tmp_path / "o"), "--profile", "smoke"])
    assert rc == 2 and "is a folder" in _one_line_err(capsys)


def test_finding9_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import distill_lab.pipeline as p

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(p.Recipe, "load", classmethod(lambda cls, path: interrupted()))
    try:
        rc = main(["compress", "--recipe", _recipe(tmp_path), "--out", str(tmp_path / "o"), "--profile", "smoke"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == 130 and "interrupted" in _one_line_err(capsys)


def test_saving_never_replaces_a_folder_of_someone_elses_files(tmp_path):
    """save_quantized (atomic_folder) replaces only a missing, empty or distill_lab-written folder."""
    import pytest

    from distill_lab.models import tiny_llama
    from distill_lab.quantization import Int8WeightOnlyConfig, quantize_, save_quantized

    model = tiny_llama(num_layers=1, seed=0)
    quantize_(model, Int8WeightOnlyConfig())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="did not write"):
        save_quantized(model, mine)
    assert (mine / "notes.txt").read_text() == "a user's file" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    ours = tmp_path / "ours"
    save_quantized(model, ours)
    save_quantized(model, ours)  # our own earlier save is replaced, as before
    (tmp_path / "empty").mkdir()
    save_quantized(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
