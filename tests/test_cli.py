"""The command line: help everywhere, one-line errors with non-zero exit codes, compress -> load_model -> generate."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill_lab.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, f"error should be one line, got {err!r}"
    return err


def test_help_for_every_command():
    out = subprocess.run([sys.executable, "-m", "distill_lab", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "compress" in out.stdout and "report" in out.stdout
    for cmd in ("course", "eval", "compress", "report"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0


def test_compress_help_lists_step_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    for kind in ("prune", "distil", "quantize", "qat", "layer_drop"):
        assert kind in out


def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_recipe_step_is_a_one_line_error(tmp_path, capsys):
    rc = main(["compress", "--recipe", _recipe(tmp_path, "steps:\n  - sparsify: {amount: 0.5}\n"),
               "--out", str(tmp_path / "o"), "--profile", "smoke"])
    assert rc != 0
    assert "unknown recipe step 'sparsify'; allowed:" in _err(capsys)


def test_missing_recipe_file(tmp_path, capsys):
    rc = main(["compress", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert rc != 0 and "nope.yaml" in _err(capsys) and not (tmp_path / "o").exists()


def test_invalid_config_value(tmp_path, capsys):
    rc = main(["compress", "--recipe", _recipe(tmp_path, "steps:\n  - quantize: {format: int4, group_size: 63}\n"),
               "--out", str(tmp_path / "o")])
    assert rc != 0 and "group_size=63" in _err(capsys)


def test_unknown_profile(tmp_path, capsys):
    rc = main(["compress", "--recipe", str(ROOT / "recipes" / "combined.yaml"), "--out", str(tmp_path / "o"),
               "--profile", "huge"])
    assert rc != 0 and "unknown profile 'huge'; allowed: smoke, laptop, gpu" in _err(capsys)
    assert main(["report", "--profile", "huge"]) != 0
    assert "unknown profile" in _err(capsys)
    assert main(["eval", "teacher", "--profile", "huge"]) != 0
    _err(capsys)


def test_eval_missing_model_folder(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "missing-model"), "--profile", "smoke"])
    assert rc != 0 and "does not exist" in _err(capsys)


@pytest.mark.teacher
def test_compress_then_load_model_then_generate(tmp_path, teacher, capsys):
    """A small model with the teacher's vocabulary and tokenizer goes through compress; the export reloads."""
    import distill_lab as dl

    _, tokenizer = teacher
    small = dl.tiny_llama(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2)
    src = tmp_path / "small"
    small.save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = _recipe(tmp_path, "name: tiny\nsteps:\n  - prune: {channels_keep: 0.5}\n"
                               "  - quantize: {format: int4, group_size: 64}\n")
    out = tmp_path / "compressed"
    rc = main(["compress", "--recipe", recipe, "--out", str(out), "--teacher", str(src), "--profile", "smoke",
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "reloaded with distill_lab.load_model and generated" in captured.out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    model, tok = dl.load_model(out, device="cpu")
    text = dl.generate_samples(model, tok, ["def f(x):"], max_new_tokens=4)[0]
    assert isinstance(text, str)
    assert dl.weights_bytes(out) < dl.weights_bytes(src)
    # eval prints the model card of the export
    assert main(["eval", str(out), "--profile", "smoke"]) == 0
    card = capsys.readouterr().out
    assert "ppl pydoc" in card and "size on disk" in card
    # its tokenizer is the teacher's: the card gives the perplexity ratio to the teacher on the same windows
    assert re.search(r"ppl pydoc .*\(in-domain, test split, 4 windows, ratio [0-9.]+ to the teacher's [0-9.]+\)", card)
    assert "decode, lean" in card
    # the export is recognised: replaced only with --overwrite (issue 11), then resumed from the saved steps
    args = ["compress", "--recipe", recipe, "--out", str(out), "--teacher", str(src), "--profile", "smoke", "--quiet"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert "reloaded with distill_lab.load_model" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
