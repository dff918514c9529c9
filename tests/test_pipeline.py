"""The combined-compression pipeline on tiny random models: recipes, steps, resume, guard, export."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from distill_lab import pipeline
from distill_lab.models import tiny_llama
from distill_lab.pipeline import QualityGuardError, Recipe, Step, run_recipe
from distill_lab.pipeline.runner import _check_guard
from distill_lab.serialization import load_saved
from distill_lab.profiles import get_profile
from distill_lab.views.combined import recipe_from_knobs

PROFILE = dataclasses.replace(get_profile("smoke"), seq_len=32, eval_windows=4, batch_size=4,
                              train_steps=2, train_batch_size=2, calib_windows=2, latency_batch=1,
                              latency_seq=16, decode_tokens=2, repeats=1)


def _windows(n, seed, vocab=256, T=32):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern (token t+1 = token t + 1 mod vocab) with some noise
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % vocab
    noise = torch.rand(n, T, generator=g) < 0.2
    return torch.where(noise, torch.randint(0, vocab, (n, T), generator=g), ids)


@pytest.fixture
def data():
    return {"windows": {"pydoc": _windows(4, 1), "stdlib-code": _windows(4, 2)},
            "train_windows": _windows(8, 3)}


@pytest.fixture
def teacher64():
    """A tiny Llama whose widths divide the int4 group size 64."""
    return tiny_llama(hidden_size=64, intermediate_size=128, num_layers=2)


def _run(teacher, recipe, out, data, **kw):
    return run_recipe(teacher, None, recipe, out, profile=PROFILE, progress=False, **kw, **data)


# -- recipes -------------------------------------------------------------------------------------

def test_recipe_rejects_bad_input_naming_field_value_and_allowed():
    with pytest.raises(ValueError, match=r"unknown recipe step 'sparsify'; allowed: .*prune.*quantize"):
        Recipe("r", [{"sparsify": {}}])
    with pytest.raises(ValueError, match=r"heads_keep=1\.5.*allowed"):
        Recipe("r", [{"prune": {"heads_keep": 1.5}}])
    with pytest.raises(ValueError, match=r"unknown field 'keep'; allowed: .*channels_keep"):
        Recipe("r", [{"prune": {"keep": 0.5}}])
    with pytest.raises(ValueError, match=r"format='int3'; allowed: int8, w8a8, int4"):
        Recipe("r", [{"quantize": {"format": "int3"}}])
    with pytest.raises(ValueError, match=r"steps=0; allowed"):
        Recipe("r", [{"distil": {"steps": 0}}])
    with pytest.raises(ValueError, match=r"max_ppl_ratio=0\.5; allowed"):
        Recipe("r", [{"quantize": {}}], max_ppl_ratio=0.5)
    with pytest.raises(ValueError, match=r"non-empty list"):
        Recipe("r", [])
    with pytest.raises(ValueError, match=r"unknown field 'stpes'"):
        Recipe.from_dict({"name": "r", "stpes": []})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trips_through_yaml_and_json(tmp_path, suffix):
    recipe = Recipe("combo", [Step("prune", {"channels_keep": 0.5, "heads_keep": 0.67}),
                              {"kind": "distil", "config": {"steps": 3, "lr": 1e-4}},
                              {"quantize": {"format": "int4", "group_size": 64}}],
                    max_ppl_ratio=2.0, description="test")
    path = recipe.save(tmp_path / f"r{suffix}")
    again = Recipe.load(path)
    assert again.to_dict() == recipe.to_dict()
    assert [s.kind for s in again.steps] == ["prune", "distil", "quantize"]
    assert again.fingerprint(0) == recipe.fingerprint(0) != recipe.fingerprint(1)


def test_quantize_and_qat_steps_hold_the_format_config():
    from distill_lab.pipeline.steps import QATStep, QuantizeStep
    from distill_lab.quantization import Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig

    step = QuantizeStep.from_knobs({"format": "int4", "group_size": 32, "embedding_bits": 4, "algorithm": "awq"})
    assert step.config == Int4WeightOnlyConfig(group_size=32, embedding_bits=4) and step.algorithm == "awq"
    assert QuantizeStep.from_knobs({"format": "w8a8", "head": "w8a8"}).config == Int8DynamicConfig(head="w8a8")
    assert QuantizeStep.from_knobs({}).config == Int4WeightOnlyConfig()  # format: int4 by default
    with pytest.raises(ValueError, match=r"unknown field 'group_size'; allowed: format, algorithm, embedding_bits$"):
        QuantizeStep.from_knobs({"format": "int8", "group_size": 64})
    assert QuantizeStep.from_knobs({"format": "int8"}).config == Int8WeightOnlyConfig()
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig\.group_size=63; allowed: an even int"):
        QuantizeStep.from_knobs({"group_size": 63})
    with pytest.raises(ValueError, match=r"algorithm 'gptq' needs format int4"):
        QuantizeStep.from_knobs({"format": "w8a8", "algorithm": "gptq"})
    qat = QATStep.from_knobs({"format": "int4", "group_size": 32, "steps": 2, "kd_temperature": 3.0})
    assert qat.config == Int4WeightOnlyConfig(group_size=32) and qat.distil_step().steps == 2
    assert qat.distil_step().kd_temperature == 3.0
    with pytest.raises(ValueError, match=r"step 'qat': unknown field 'algorithm'"):
        QATStep.from_knobs({"algorithm": "awq"})
    assert Step("quantize", {"format": "int4", "group_size": 64}).label == "quantize(format=int4, group_size=64)"


@pytest.mark.parametrize("kind", ["quantize", "qat"])
def test_a_recipe_that_says_method_is_told_format(tmp_path, kind):
    path = tmp_path / "old.yaml"
    path.write_text(f"steps:\n  - {kind}: {{method: int4, group_size: 64}}\n")
    with pytest.raises(ValueError, match=rf"step '{kind}': method='int4'; allowed: format \(how the weights are "
                                         r"stored: int8, w8a8, int4\), e.g. format: int4"):
        Recipe.load(path)


def test_recipe_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - prune: {channels_keep: 2}\n")
    with pytest.raises(ValueError, match=r"channels_keep=2"):
        Recipe.load(bad)
    (tmp_path / "r.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"suffix '\.txt'; allowed"):
        Recipe.load(tmp_path / "r.txt")


def test_shipped_recipes_are_valid():
    folder = Path(__file__).resolve().parent.parent / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert files, "recipes/ should ship at least one recipe"
    for path in files:
        assert Recipe.load(path).steps


# -- running -------------------------------------------------------------------------------------

def test_run_recipe_measures_every_step_and_saves_reloadable_models(tmp_path, teacher64, data):
    recipe = Recipe("combo", [{"prune": {"channels_keep": 0.5}},
                              {"distil": {"steps": 2, "batch_size": 2, "top_k": 8}},
                              {"quantize": {"format": "int4", "group_size": 64}}])
    result = _run(teacher64, recipe, tmp_path / "run", data)
    assert [s.kind for s in result.steps] == ["prune", "distil", "quantize"]
    t = result.teacher
    for s in result.steps:
        m = s.metrics
        for key in ("ppl_pydoc", "ppl_stdlib-code", "size_bytes", "prefill_tokens_per_s",
                    "decode_tokens_per_s", "ppl_ratio_pydoc", "size_reduction"):
            assert key in m and m[key] > 0
        assert m["ppl_ratio_pydoc"] == pytest.approx(m["ppl_pydoc"] / t["ppl_pydoc"])
        assert (Path(s.folder) / "step.json").is_file()
    prune_, distil, quant = result.steps
    assert prune_.metrics["params"] < t["params"]
    assert prune_.metrics["size_bytes"] < t["size_bytes"]
    assert quant.metrics["size_bytes"] < distil.metrics["size_bytes"] / 3  # int4 + int8 embedding
    assert len(distil.extras["train_loss"]) == 2
    assert not list((tmp_path / "run" / "steps").glob(".tmp-*"))  # nothing half-written left
    # the saved final model reloads and computes the same logits
    reloaded, tok = load_saved(quant.folder, device="cpu")
    ids = data["windows"]["pydoc"][:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-4, rtol=1e-4)
    assert tok is None
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(summary["steps"]) == 3 and "| 3 quantize |" in result.markdown()


def test_interrupted_recipe_resumes_without_redoing_finished_steps(tmp_path, data, scratch_steps):
    calls = {"scale": 0, "flaky": 0}

    def scale(model, config, ctx):
        calls["scale"] += 1
        with torch.no_grad():
            model.model.norm.weight.mul_(config.get("factor", 1.0))
        return model

    def flaky(model, config, ctx):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise KeyboardInterrupt  # the run is killed during step 2
        return model

    scratch_steps("scale", scale)
    scratch_steps("flaky", flaky)
    teacher = tiny_llama()
    recipe = Recipe("resume", [{"scale": {"factor": 0.9}}, {"flaky": {}}])
    with pytest.raises(KeyboardInterrupt):
        _run(teacher, recipe, tmp_path / "run", data)
    assert calls == {"scale": 1, "flaky": 1}
    assert not (tmp_path / "run" / "steps" / "02_flaky").exists()
    result = _run(teacher, recipe, tmp_path / "run", data)
    assert calls == {"scale": 1, "flaky": 2}  # step 1 reused, step 2 run
    assert result.steps[0].resumed and not result.steps[1].resumed
    # the resumed model carries step 1's change
    assert torch.allclose(result.model.model.norm.weight, teacher.model.norm.weight * 0.9)
    assert torch.equal(teacher.model.norm.weight, tiny_llama().model.norm.weight)  # teacher untouched
    # a changed step 1 invalidates the saved prefix
    changed = Recipe("resume", [{"scale": {"factor": 0.8}}, {"flaky": {}}])
    _run(teacher, changed, tmp_path / "run", data)
    assert calls["scale"] == 2
    # the same profile name with other sizes (e.g. more distillation steps) does not reuse either
    run_recipe(teacher, None, changed, tmp_path / "run", profile=dataclasses.replace(PROFILE, recipe_steps=3),
               progress=False, **data)
    assert calls["scale"] == 3


def test_speed_is_never_reused_from_an_earlier_run(tmp_path, data, scratch_steps):
    """Cached teacher metrics and resumed steps keep perplexity and size but are timed again."""
    scratch_steps("same", lambda model, config, ctx: model)
    teacher, windows = tiny_llama(), data["windows"]
    cache = tmp_path / "teacher.json"
    first = pipeline.teacher_metrics(teacher, None, PROFILE, windows, cache=cache, progress=False)
    saved = json.loads(cache.read_text())["metrics"]
    assert "ppl_pydoc" in saved and not set(pipeline.SPEED_KEYS) & set(saved)
    # a cache written by an older version, with a speed measured at a busy moment
    cache.write_text(json.dumps({"profile": PROFILE.name, "code": pipeline.code_version(),
                                 "metrics": {**first, "prefill_tokens_per_s": 1e-3}}))
    again = pipeline.teacher_metrics(teacher, None, PROFILE, windows, cache=cache, progress=False)
    assert again["ppl_pydoc"] == first["ppl_pydoc"] and again["prefill_tokens_per_s"] > 1

    recipe = Recipe("timed", [{"same": {}}])
    _run(teacher, recipe, tmp_path / "run", data, teacher_stats=again)
    state_file = tmp_path / "run" / "steps" / "01_same" / pipeline.STATE_FILE
    state = json.loads(state_file.read_text())
    state["metrics"].update(prefill_tokens_per_s=1e-3, prefill_speedup=1e-3,  # as if timed under heavy load
                            prefill_speedup_iqr=[1e-3, 1e-3])
    state_file.write_text(json.dumps(state))
    resumed = _run(teacher, recipe, tmp_path / "run", data, teacher_stats=again)
    m = resumed.steps[0].metrics
    assert resumed.steps[0].resumed and m["prefill_tokens_per_s"] > 1
    # the speed-up is timed again, round by round against the teacher in this run (not the stale 1e-3)
    r = pipeline.speedup(m, "prefill")
    assert r.rounds == m["speed_rounds"] == PROFILE.repeats and r.low <= r.median <= r.high and r.median != 1e-3
    assert m["ppl_pydoc"] == state["metrics"]["ppl_pydoc"]


def test_saved_steps_and_teacher_numbers_from_other_code_are_recomputed(tmp_path, data, scratch_steps, monkeypatch):
    calls = {"n": 0}

    def counted(model, config, ctx):
        calls["n"] += 1
        return model

    scratch_steps("counted", counted)
    teacher, recipe = tiny_llama(), Recipe("versioned", [{"counted": {}}])
    _run(teacher, recipe, tmp_path / "run", data)
    _run(teacher, recipe, tmp_path / "run", data)
    assert calls["n"] == 1  # same code: resumed
    cache = tmp_path / "teacher.json"
    pipeline.teacher_metrics(teacher, None, PROFILE, data["windows"], cache=cache, progress=False)
    stale = json.loads(cache.read_text())
    stale["metrics"]["ppl_pydoc"] = 1.0
    cache.write_text(json.dumps(stale))
    monkeypatch.setattr(pipeline.runner, "code_version", lambda: "another-version")
    again = _run(teacher, recipe, tmp_path / "run", data)
    assert calls["n"] == 2 and not again.steps[0].resumed  # other code: recomputed
    fresh = pipeline.teacher_metrics(teacher, None, PROFILE, data["windows"], cache=cache, progress=False)
    assert fresh["ppl_pydoc"] != 1.0 and json.loads(cache.read_text())["code"] == "another-version"


def test_quality_guard_stops_with_a_clear_message(tmp_path, data, scratch_steps):
    def scramble(model, config, ctx):
        with torch.no_grad():
            model.model.norm.weight.mul_(100.0)  # confident, wrong predictions
        return model

    def never(model, config, ctx):
        raise AssertionError("the guard should stop before this step")

    scratch_steps("scramble", scramble)
    scratch_steps("never", never)
    recipe = Recipe("guarded", [{"scramble": {}}, {"never": {}}], max_ppl_ratio=1.05)
    with pytest.raises(QualityGuardError, match=r"stopped after step 1 \(scramble\): perplexity ratio "
                                                r"[\d.]+ > max_ppl_ratio 1\.05"):
        _run(tiny_llama(), recipe, tmp_path / "run", data)


def test_guard_skips_a_step_that_distillation_heals_next():
    recipe = Recipe("g", [{"prune": {"channels_keep": 0.5}}, {"distil": {"steps": 1}}, {"quantize": {}}],
                    max_ppl_ratio=1.5)
    bad = {"ppl_ratio_pydoc": 9.0, "ppl_pydoc": 99.0}

    def rec(i):
        return pipeline.StepRecord(index=i, kind=recipe.steps[i - 1].kind, config={}, folder="f", metrics=bad,
                                   seconds=0.0)

    _check_guard(recipe, rec(1), "ppl_pydoc")  # prune, healed by the next step: not checked
    for i in (2, 3):
        with pytest.raises(QualityGuardError, match=f"after step {i}"):
            _check_guard(recipe, rec(i), "ppl_pydoc")


def test_layer_drop_then_int8_quantize(tmp_path, data):
    teacher = tiny_llama(num_layers=4)
    recipe = Recipe("student", [{"layer_drop": {"keep_every": 2}}, {"quantize": {"format": "w8a8"}}])
    result = _run(teacher, recipe, tmp_path / "run", data)
    assert result.model.config.num_hidden_layers == 2
    assert result.steps[1].extras["quantized"]
    reloaded, _ = load_saved(result.final.folder, device="cpu")
    ids = data["windows"]["pydoc"][:1]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-4, rtol=1e-4)


# -- the comparison table, the panel, the exercises -----------------------------------------------

def test_verdict_and_claim_text():
    claim = pipeline.SeedClaim((4, 4), (2, 3), (0, 1))
    assert claim.text() == "4× / 2–3× / <1%"
    good = {"size_reduction": 3.9, "prefill_speedup": 1.1, "decode_speedup": 2.5, "dppl_pct_pydoc": 0.5}
    assert pipeline.verdict(good, claim)["verdict"] == "holds"
    bad = {"size_reduction": 2.0, "prefill_speedup": 1.0, "decode_speedup": 1.0, "dppl_pct_pydoc": 5.0}
    assert pipeline.verdict(bad, claim)["verdict"] == "does not hold"
    mixed = dict(good, dppl_pct_pydoc=4.0)
    v = pipeline.verdict(mixed, claim)
    assert v["verdict"] == "partly holds" and "quality ✗" in v["why"]
    # the better phase's spread crosses 0.9 x 2 = 1.8: speed is within noise, not a ✓ or a ✗
    noisy = dict(good, decode_speedup=1.9, decode_speedup_iqr=[1.6, 2.2], prefill_speedup_iqr=[1.0, 1.2],
                 speed_rounds=5)
    v = pipeline.verdict(noisy, claim)
    assert v["speed"] is None and v["verdict"] == "partly holds" and "speed within noise" in v["why"]
    assert pipeline.verdict(dict(noisy, decode_speedup_iqr=[1.85, 2.2]), claim)["verdict"] == "holds"


def test_verdict_takes_the_lean_decode_like_for_like_never_against_the_hf_forward():
    from distill_lab.pipeline.measure import relative, speedup

    claim = pipeline.SeedClaim((4, 4), (3, 4), (0, 1))
    slow_hf = {"size_reduction": 4.0, "prefill_speedup": 1.2, "decode_speedup": 1.5, "dppl_pct_pydoc": 0.5}
    assert pipeline.verdict(slow_hf, claim)["speed"] is False  # the HF forward alone: 1.5x < 0.9 x 3
    # lean decode 3.2x the fp32 teacher's lean decode: like for like, the speed column holds
    assert pipeline.verdict(dict(slow_hf, decode_lean_speedup=3.2), claim)["speed"] is True
    # 5x against the teacher's *HF* decode mixes two engines: never what the verdict reads
    mixed = dict(slow_hf, decode_lean_speedup=2.0, decode_lean_hf_speedup=5.0)
    assert pipeline.verdict(mixed, claim)["speed"] is False
    assert speedup(slow_hf, "decode_lean") is None and speedup(mixed, "decode_lean_hf").median == 5.0
    with pytest.raises(ValueError, match="phase='lean'"):
        speedup(slow_hf, "lean")
    # unpaired measurements: the ratios come from tokens/s, each engine against its own and against HF fp32
    base = {"size_bytes": 100, "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0,
            "decode_lean_tokens_per_s": 20.0}
    model = {"size_bytes": 25, "prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 15.0,
             "decode_lean_tokens_per_s": 60.0}
    r = relative(model, base)
    assert r["decode_lean_speedup"] == 3.0 and r["decode_lean_hf_speedup"] == 6.0 and r["size_reduction"] == 4.0


def test_seed_rows_and_shipped_combined_recipe_agree():
    rows = pipeline.seed_rows()
    assert [r[0] for r in rows] == ["INT8 quantization", "INT4 quantization", "Distillation", "50% pruning",
                                    "Combined"]
    shipped = Recipe.load(Path(__file__).resolve().parent.parent / "recipes" / "combined.yaml")
    assert [s.to_dict() for s in shipped.steps] == [s.to_dict() for s in pipeline.combined_recipe().steps]
    # one story: the Distillation row is the combined recipe's student, distilled (its first two steps),
    # so a table run next to the combined recipe adopts that row instead of training it again
    recipes = {name: recipe for name, recipe, _ in rows}
    assert [s.to_dict() for s in recipes["Distillation"].steps] == [s.to_dict() for s in shipped.steps[:2]]
    assert recipes["Distillation"].fingerprint(1) == shipped.fingerprint(1)
    # the combined model is int4 everywhere (its 10x needs the int4 embedding), healed by QAT from AWQ + GPTQ's grid;
    # the INT4 row is lesson 02's best one-shot variant: AWQ + GPTQ blocks with the int8 embedding
    assert shipped.steps[2].kind == "qat" and shipped.steps[2].config["embedding_bits"] == 4
    assert shipped.steps[2].config["start"] == "awq+gptq"
    int4 = recipes["INT4 quantization"].steps[0].config
    assert int4["algorithm"] == "awq+gptq" and int4["embedding_bits"] == 8


def test_comparison_table_on_a_tiny_teacher(tmp_path, teacher64, data, monkeypatch):
    monkeypatch.setattr(pipeline.report, "eval_windows", lambda tok, prof: data["windows"])
    rows = [("INT8 quantization", Recipe("int8", [{"quantize": {"format": "int8"}}]),
             pipeline.SeedClaim((4, 4), (2, 3), (0, 1))),
            ("50% pruning", Recipe("p", [{"prune": {"channels_keep": 0.5}}]),
             pipeline.SeedClaim((2, 2), (1.5, 1.5), (1, 2)))]
    table = pipeline.comparison_table(teacher64, None, PROFILE, tmp_path / "work", rows=rows, progress=False,
                                      task=None)
    assert [r["name"] for r in table.rows] == ["INT8 quantization", "50% pruning"]
    md = table.markdown()
    assert md.count("\n| ") == 3 and "| INT8 quantization |" in md and "nan" not in md
    # timed as deployed: every row and the teacher in the same rounds, in both engines, both fp32 baselines named
    assert "decode, lean vs lean fp32 (IQR)" in md and "decode, lean vs HF fp32 (IQR)" in md
    assert "tok/s in the lean decoder" in md and "the two fp32 baselines" in md
    rounds = {r["metrics"]["speed_rounds"] for r in table.rows}
    assert rounds == {PROFILE.repeats} and table.teacher["decode_lean_tokens_per_s"] > 0
    bars = table.speed_bars()
    assert list(bars) == ["INT8", "50% pruning"] and bars["INT8"]["decode, lean vs lean fp32"][0] > 0
    paths = table.save(tmp_path / "reports")
    assert [p.name for p in paths] == ["comparison.md", "comparison.json", "comparison_pareto.png"]
    data_json = json.loads(paths[1].read_text())
    assert data_json["rows"][0]["metrics"]["size_reduction"] > 1
    # a second call reuses the finished rows (no new step folders are written)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("step.json")}
    pipeline.comparison_table(teacher64, None, PROFILE, tmp_path / "work", rows=rows, progress=False, task=None)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("step.json")}


def test_comparison_table_scores_every_row_on_a_task_beside_perplexity(tmp_path, teacher64, data, monkeypatch):
    # the harness itself is tested in test_task_accuracy; here: which models are scored, and the column
    monkeypatch.setattr(pipeline.report, "eval_windows", lambda tok, prof: data["windows"])
    scored = []

    def fake_accuracy(model, tokenizer, task, limit=None, progress=True):
        scored.append((model is teacher64, limit))
        acc = 0.5 if model is teacher64 else 0.375  # every row's model is its saved final folder, reloaded
        return {task: {"acc": acc, "acc_stderr": 0.05, "n": 16, "chance": 0.25}}

    monkeypatch.setattr(pipeline.report, "task_accuracy", fake_accuracy)
    rows = [("INT8 quantization", Recipe("int8", [{"quantize": {"format": "int8"}}]),
             pipeline.SeedClaim((4, 4), (2, 3), (0, 1)))]
    table = pipeline.comparison_table(teacher64, None, PROFILE, tmp_path / "work", rows=rows, progress=False,
                                      task="pydoc_mc")
    assert scored == [(True, pipeline.CLAIMS_TASK_LIMIT[PROFILE.name]), (False, pipeline.CLAIMS_TASK_LIMIT[PROFILE.name])]
    m = table.rows[0]["metrics"]
    assert m["acc_pydoc_mc"] == 0.375 and m["dacc_pydoc_mc"] == pytest.approx(-12.5)
    md = table.markdown()
    assert "pydoc_mc accuracy (± s.e.)" in md and "| 0.375 ± 0.050 |" in md and "accuracy 0.500 ± 0.050 on 16" in md
    assert json.loads(table.save(tmp_path / "reports")[1].read_text())["task"] == "pydoc_mc"


def test_recipe_from_knobs_and_panel_runs_only_on_click():
    from distill_lab.widgets import recipe_panel

    r = recipe_from_knobs(heads_keep=0.67, channels_keep=1.0, distil_steps=5, quantize="int4")
    assert [s.kind for s in r.steps] == ["prune", "distil", "quantize"]
    assert r.steps[0].config == {"heads_keep": 0.67, "importance": "activation"}
    with pytest.raises(ValueError, match="no step"):
        recipe_from_knobs()
    with pytest.raises(ValueError, match="quantize='int3'.*'int4 \\+ AWQ'"):
        recipe_from_knobs(quantize="int3")
    # the panel's default knobs build the shipped combined recipe, step for step (distil's length aside)
    calls = []
    panel = recipe_panel(lambda **k: calls.append(recipe_from_knobs(**k)) or calls[-1], lambda r, ax: None)
    panel.children[-2].click()  # the "Run recipe" button, on the panel's defaults
    default, shipped = calls[0], pipeline.combined_recipe()
    assert [s.kind for s in default.steps] == [s.kind for s in shipped.steps]
    assert default.steps[0].config == shipped.steps[0].config and default.steps[2].config == shipped.steps[2].config
    assert {k: v for k, v in default.steps[1].config.items() if k != "steps"} == shipped.steps[1].config
    assert recipe_from_knobs(quantize="w8a8 + SmoothQuant").steps[0].config["algorithm"] == "smoothquant"
    calls.clear()
    panel.children[1].value = 0.25  # moving a slider runs nothing (384 of 1536 channels)
    assert calls == []
    panel.children[-2].click()  # the "Run recipe" button
    assert len(calls) == 1 and panel.result.steps[0].config["channels_keep"] == 0.25


def test_exercise_checkers_accept_right_and_reject_wrong(capsys):
    from distill_lab.exercises.combined import check_overall_reduction, check_pareto_front

    assert check_overall_reduction(lambda e, fe, fb: 1 / (e / fe + (1 - e) / fb))
    with pytest.raises(AssertionError):
        check_overall_reduction(lambda e, fe, fb: e * fe + (1 - e) * fb)

    def front(sizes, ppls):
        return torch.tensor([float(not any((sizes[j] <= sizes[i]) and (ppls[j] <= ppls[i]) and
                                           ((sizes[j] < sizes[i]) or (ppls[j] < ppls[i]))
                                           for j in range(len(sizes)))) for i in range(len(sizes))])

    assert check_pareto_front(front)
    with pytest.raises(AssertionError):
        check_pareto_front(lambda s, p: (p <= p.min()).float())

    def stub(*args):
        raise NotImplementedError

    assert check_overall_reduction(stub) is False


def test_qat_step_trains_then_converts_to_real_int4(tmp_path, teacher64, data):
    recipe = Recipe("qat", [{"qat": {"format": "int4", "group_size": 64, "steps": 2, "batch_size": 2,
                                     "top_k": 8}}])
    result = _run(teacher64, recipe, tmp_path / "run", data)
    step = result.final
    assert len(step.extras["train_loss"]) == 2 and step.extras["quantized"]["int4_weight_only"] == 14
    assert step.metrics["size_reduction"] > 3
    with pytest.raises(ValueError, match=r"step 'qat': .*group_size=63"):
        Recipe("bad", [{"qat": {"group_size": 63}}])


def test_a_shorter_qat_step_reads_the_distil_steps_teacher_cache(tmp_path, teacher64, data):
    """A qat step after a distil step trains on the first windows of the same cached teacher logits (one file)."""
    recipe = Recipe("dq", [{"distil": {"steps": 2, "batch_size": 2, "top_k": 8}},
                           {"qat": {"format": "int4", "group_size": 64, "steps": 1, "batch_size": 2, "top_k": 8}}])
    _run(teacher64, recipe, tmp_path / "run", data, cache_dir=tmp_path / "cache")
    caches = list((tmp_path / "cache").glob("teacher_top8_*.safetensors"))
    assert len(caches) == 1
    from distill_lab.distillation import TeacherCache

    assert len(TeacherCache.load(caches[0])) >= 4  # the profile's budget of windows (or all there are), not 2


def test_qat_from_gptq_grid_and_awq_gptq_quantize_steps(tmp_path, teacher64, data):
    """Quantization that heals: a qat step may start from AWQ + GPTQ's int4 weights (dequantized) and trains
    through the embedding's rounding; a quantize step may chain AWQ scaling and GPTQ rounding."""
    from distill_lab.pipeline.steps import QATStep, QuantizeStep

    assert QuantizeStep.from_knobs({"algorithm": "awq+gptq"}).algorithm == "awq+gptq"
    with pytest.raises(ValueError, match=r"algorithm 'awq\+gptq' needs format int4"):
        QuantizeStep.from_knobs({"format": "w8a8", "algorithm": "awq+gptq"})
    assert QATStep.from_knobs({"start": "awq+gptq"}).start == "awq+gptq"
    with pytest.raises(ValueError, match=r"start='gptq'; allowed: float, awq, awq\+gptq"):
        QATStep.from_knobs({"start": "gptq"})
    with pytest.raises(ValueError, match=r"start='awq' with format='w8a8'"):
        QATStep.from_knobs({"format": "w8a8", "start": "awq"})
    with pytest.raises(ValueError, match=r"embedding=1; allowed: true or false"):
        QATStep.from_knobs({"embedding": 1})
    one_shot = _run(teacher64, Recipe("ag", [{"quantize": {"format": "int4", "group_size": 64, "embedding_bits": 4,
                                                            "algorithm": "awq+gptq"}}]), tmp_path / "ag", data)
    assert one_shot.final.extras["awq_exponents"] and one_shot.final.extras["quantized"]["int4_embedding"] == 1
    healed = _run(teacher64, Recipe("qg", [{"qat": {"format": "int4", "group_size": 64, "embedding_bits": 4,
                                                    "start": "awq+gptq", "steps": 2, "batch_size": 2, "top_k": 8,
                                                    "lr": 1e-6}}]), tmp_path / "qg", data)
    assert healed.final.extras["awq_exponents"] and healed.final.extras["quantized"]["int4_embedding"] == 1
    # two steps at a tiny learning rate from GPTQ's grid: the model is (nearly) the one-shot one
    ratio = healed.final.metrics["ppl_pydoc"] / one_shot.final.metrics["ppl_pydoc"]
    assert 0.9 < ratio < 1.1, ratio


def test_sibling_recipes_share_an_identical_first_step(tmp_path, data, scratch_steps):
    calls = {"scale": 0}

    def scale(model, config, ctx):
        calls["scale"] += 1
        with torch.no_grad():
            model.model.norm.weight.mul_(config["factor"])
        return model

    def noop(model, config, ctx):
        return model

    scratch_steps("scale", scale)
    scratch_steps("noop", noop)
    teacher = tiny_llama()
    _run(teacher, Recipe("a", [{"scale": {"factor": 0.5}}, {"noop": {"x": 1}}]), tmp_path / "a", data)
    b = _run(teacher, Recipe("b", [{"scale": {"factor": 0.5}}, {"noop": {"x": 2}}]), tmp_path / "b", data)
    assert calls["scale"] == 1 and b.steps[0].resumed
    assert torch.allclose(b.model.model.norm.weight, teacher.model.norm.weight * 0.5)
    _run(teacher, Recipe("c", [{"scale": {"factor": 0.7}}]), tmp_path / "c", data)  # different prefix
    assert calls["scale"] == 2


def test_seed_rows_carry_the_course_table_claims():
    """The claims beside each measured row are the seed document's, verbatim."""
    claims = {name: (c.size, c.speed, c.quality_loss_pct) for name, _, c in pipeline.seed_rows()}
    assert claims == {"INT8 quantization": ((4, 4), (2, 3), (0, 1)),
                      "INT4 quantization": ((8, 8), (3, 4), (1, 3)),
                      "Distillation": ((5, 10), (5, 10), (2, 5)),
                      "50% pruning": ((2, 2), (1.5, 1.5), (1, 2)),
                      "Combined": ((10, 20), (5, 10), (3, 8))}


def _table_widths(md: str) -> list[int]:
    """Cells in the header, separator and rows of the Markdown table in ``md`` (a table whose header and
    separator differ in width is not rendered as a table)."""
    return [len(line.strip().strip("|").split("|")) for line in md.splitlines() if line.startswith("|")]


def test_claims_table_llamacpp_columns_appear_only_where_timed():
    """Two more columns and a third fp32 baseline where llama.cpp was timed; elsewhere, a line saying why not.
    The verdict may read llama.cpp against the teacher's F32 GGUF in llama.cpp (like for like)."""
    claim = pipeline.SeedClaim((4, 4), (3, 4), (0, 1))
    teacher = {"size_bytes": 2**20, "ppl_pydoc": 10.0, "ppl_stdlib-code": 20.0, "prefill_tokens_per_s": 100.0,
               "decode_tokens_per_s": 10.0, "decode_lean_tokens_per_s": 20.0, "decode_ms_per_token": 100.0}
    m = {"size_bytes": 2**18, "size_reduction": 4.0, "prefill_speedup": 1.2, "decode_speedup": 1.5,
         "decode_lean_speedup": 2.0, "decode_lean_hf_speedup": 4.0, "dppl_pct_pydoc": 0.5, "ppl_ratio_pydoc": 1.005,
         "dppl_pct_stdlib-code": 1.0, "decode_ms_per_token": 50.0}
    cpp = dict(m, decode_llamacpp_speedup=3.1, decode_llamacpp_hf_speedup=9.0)

    def table(metrics, teacher):
        row = {"name": "INT8 quantization", "metrics": metrics, "verdict": pipeline.verdict(metrics, claim),
               "claim": claim.text(), "description": "d", "recipe_text": "quantize"}
        return pipeline.ComparisonTable(rows=[row], teacher=teacher, profile="smoke")

    timed = table(cpp, dict(teacher, decode_llamacpp_tokens_per_s=30.0))
    md = timed.markdown()
    assert "decode, llama.cpp vs llama.cpp fp32 (IQR) | decode, llama.cpp vs HF fp32 (IQR) |" in md
    assert "30.0 tok/s in llama.cpp (F32 GGUF): the three fp32 baselines" in md and "| 3.10× (3.10–3.10) | 9.00× (9.00–9.00) |" in md
    assert _table_widths(md) == [14, 14, 14] and timed.rows[0]["verdict"]["speed"] is True  # 3.1x >= 0.9 x 3, llama.cpp alone
    assert list(timed.speed_bars()["INT8"])[-2:] == ["decode, llama.cpp vs llama.cpp fp32",
                                                     "decode, llama.cpp vs HF fp32"]
    not_timed = table(m, dict(teacher, decode_llamacpp_skipped="llama-cpp-python is not installed (pip ...)"))
    md = not_timed.markdown()
    assert "llama.cpp vs" not in md and "the two fp32 baselines" in md and _table_widths(md) == [12, 12, 12]
    assert "No llama.cpp columns: llama-cpp-python is not installed" in md
    assert not_timed.rows[0]["verdict"]["speed"] is False and "llama.cpp" not in "".join(not_timed.speed_bars()["INT8"])
