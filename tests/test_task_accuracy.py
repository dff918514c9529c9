"""Task accuracy through lm-evaluation-harness, offline: the harness end to end on a tiny model, an oracle and a
guesser against the shipped tasks, the scoring shortcut against plain scoring, errors, the CLI, and the
committed task files against a fresh build."""

import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import distill_lab as dl  # noqa: E402
from distill_lab import __main__ as cli  # noqa: E402
from distill_lab.evaluate import harness  # noqa: E402
from distill_lab.evaluate.tasks import OFFLINE_TASKS, TASKS_DIR, build, task_docs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class ByteTok:
    """A tokenizer over the tiny model's 256-token vocabulary: one token per UTF-8 byte."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, return_tensors=None):
        ids = list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket (the hub, a dataset download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_harness_runs_offline_end_to_end_on_a_tiny_model(tiny, no_network):
    results = dl.task_accuracy(tiny, ByteTok(), "pydoc_mc,pydoc_cloze", limit=6, progress=False)
    assert set(results) == {"pydoc_mc", "pydoc_cloze"}
    mc, cloze = results["pydoc_mc"], results["pydoc_cloze"]
    assert mc["n"] == cloze["n"] == 6
    assert mc["chance"] == pytest.approx(0.25) and cloze["chance"] is None
    for r in (mc, cloze):
        assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] >= 0.0
    assert 0.0 <= mc["acc_norm"] <= 1.0 and "acc_norm_stderr" in mc
    again = dl.task_accuracy(tiny, ByteTok(), ["pydoc_mc", "pydoc_cloze"], limit=6, progress=False)
    assert again == results  # deterministic
    lines = dl.evaluate.format_accuracy(results)
    assert lines[0].startswith("acc pydoc_mc") and "chance 0.250" in lines[0] and "acc_norm" in lines[0]


def _right_answers() -> dict[str, str]:
    """{text only that document's prompt holds: its right continuation} for every document of both tasks."""
    right = {f'documented as "{d["docstring"]}"\nIts name is {d["module"]}.': d["choices"][d["gold"]]
             for d in task_docs("pydoc_mc")}
    right.update({d["context"]: " " + d["target"] for d in task_docs("pydoc_cloze")})
    return right


def test_an_oracle_scores_one_and_a_guesser_scores_chance(monkeypatch, tiny):
    """The shipped YAML + JSONL wiring: a scorer that knows each document's answer must get every one right."""
    right = _right_answers()

    def oracle(self, requests, disable_tqdm=False):
        out = []
        for ctx, cont in (r.args for r in requests):
            hit = any(ctx.endswith(text) and cont == answer for text, answer in right.items())
            out.append((0.0 if hit else -10.0, hit))
        return out

    monkeypatch.setattr(harness._Scorer, "loglikelihood", oracle)
    best = dl.task_accuracy(tiny, ByteTok(), "pydoc_mc,pydoc_cloze", progress=False)
    assert best["pydoc_mc"]["acc"] == 1.0 and best["pydoc_mc"]["n"] == len(task_docs("pydoc_mc"))
    assert best["pydoc_cloze"]["acc"] == 1.0 and best["pydoc_cloze"]["n"] == len(task_docs("pydoc_cloze"))

    rng = random.Random(0)
    monkeypatch.setattr(harness._Scorer, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: [(rng.random(), False) for _ in requests])
    guess = dl.task_accuracy(tiny, ByteTok(), "pydoc_mc", progress=False)["pydoc_mc"]
    assert abs(guess["acc"] - guess["chance"]) < 3 * guess["acc_stderr"]  # 0.25 ± 0.025 over 300 documents
    assert guess["chance"] == pytest.approx(0.25)


def test_compressed_models_run_through_the_harness(no_network):
    """Pruned (heads, channels, layers) then int4-quantized modules: ordinary nn.Modules the adapter scores."""
    from distill_lab.pruning import StructuredConfig, prune_structured

    model = dl.tiny_llama(hidden_size=64, intermediate_size=128, num_layers=4)
    model = prune_structured(model, StructuredConfig(heads_keep=0.5, channels_keep=0.5, layers_keep=0.5),
                             calibration=[torch.randint(0, 256, (2, 32))])
    dl.quantize_(model, dl.Int4WeightOnlyConfig(group_size=32))
    result = dl.task_accuracy(model, ByteTok(), "pydoc_mc", limit=3, progress=False)["pydoc_mc"]
    assert result["n"] == 3 and 0.0 <= result["acc"] <= 1.0


@torch.inference_mode()
def test_shared_context_scoring_equals_scoring_each_pair_whole(tiny):
    """The KV-cache shortcut (one pass per context) gives the log-likelihoods of plain full-sequence passes."""
    g = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(7):  # contexts of different lengths (left padding), continuations of 1 to 4 tokens
        ctx = torch.randint(1, 256, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(3):
            cont = torch.randint(1, 256, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
            requests.append(((None, None), ctx, cont))
    lm = harness.harness_lm(tiny, ByteTok(), batch_size=3, progress=False)
    assert lm.share_context
    shared = lm._loglikelihood_tokens(requests)
    lm.share_context = False
    whole = lm._loglikelihood_tokens(requests)
    assert [g for _, g in shared] == [g for _, g in whole]
    assert torch.allclose(torch.tensor([s for s, _ in shared]), torch.tensor([s for s, _ in whole]), atol=1e-4)
    logits = tiny(torch.tensor([requests[0][1] + requests[0][2]])).logits[0].log_softmax(-1)
    n = len(requests[0][1])
    expected = sum(logits[n - 1 + k, t] for k, t in enumerate(requests[0][2]))
    assert shared[0][0] == pytest.approx(float(expected), abs=1e-4)


@torch.inference_mode()
def test_rolling_loglikelihood_is_the_sum_of_every_token(tiny):
    lm = harness.harness_lm(tiny, ByteTok(), progress=False)
    text = "def f(x):\n    return x"
    ids = [0] + list(text.encode())  # the harness conditions the first token on the end-of-text token
    logprobs = tiny(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = float(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    request = type("Request", (), {"args": (text,)})()
    assert lm.loglikelihood_rolling([request])[0] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.generate_until([request])


def test_unknown_task_names_it_and_lists_the_offline_ones(tiny):
    with pytest.raises(ValueError, match=r"unknown task 'pydoc_quiz'; offline tasks: pydoc_cloze, pydoc_mc; .*hub"):
        dl.task_accuracy(tiny, ByteTok(), "pydoc_mc,pydoc_quiz", progress=False)
    with pytest.raises(ValueError, match="named twice"):
        dl.task_accuracy(tiny, ByteTok(), "pydoc_mc,pydoc_mc")
    with pytest.raises(ValueError, match=r"limit=0; allowed"):
        dl.task_accuracy(tiny, ByteTok(), "pydoc_mc", limit=0)


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match="pip install lm-eval"):
        dl.task_accuracy(tiny, ByteTok(), "pydoc_mc")


def test_importing_distill_lab_does_not_import_lm_eval():
    code = "import sys, distill_lab as dl; dl.task_accuracy; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def _fake_card(monkeypatch, model):
    """The eval command without the teacher, perplexity windows, timings and sample (the rest is tested elsewhere)."""
    metrics = {"params": 1e6, "size_bytes": 2**20, "ppl_pydoc": 10.0, "ppl_stdlib-code": 9.0,
               "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0}
    monkeypatch.setattr(cli, "_load", lambda name, device=None: (model, ByteTok()))
    monkeypatch.setattr(cli, "eval_windows", lambda tokenizer, profile: {})
    monkeypatch.setattr(cli, "measure", lambda *a, **k: dict(metrics))
    monkeypatch.setattr(cli, "generate_samples", lambda *a, **k: [" ok"])


def test_cli_eval_prints_and_writes_task_accuracy(monkeypatch, capsys, tiny, no_network):
    _fake_card(monkeypatch, tiny)
    assert cli.main(["eval", "teacher", "--profile", "smoke", "--tasks", "pydoc_mc,pydoc_cloze", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    mc = next(line for line in out.splitlines() if line.startswith("acc pydoc_mc"))
    assert "±" in mc and "(n 4, chance 0.250" in mc and "acc pydoc_cloze" in out
    assert cli.main(["eval", "teacher", "--profile", "smoke", "--tasks", "pydoc_mc", "--limit", "4", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["task_accuracy"]["pydoc_mc"]["n"] == 4 and card["task_accuracy"]["pydoc_mc"]["chance"] == 0.25
    assert cli.main(["eval", "teacher", "--profile", "smoke", "--json"]) == 0
    assert "task_accuracy" not in json.loads(capsys.readouterr().out)  # only when asked for


def test_cli_eval_refuses_bad_tasks_before_loading_the_model(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")
    monkeypatch.setattr(cli, "_load", no_load)
    assert cli.main(["eval", "teacher", "--tasks", "pydoc_quiz"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown task 'pydoc_quiz'" in err and "pydoc_mc" in err
    assert cli.main(["eval", "teacher", "--limit", "5"]) == 2
    assert "--limit 5 without --tasks" in capsys.readouterr().err


def test_tasks_are_lm_eval_yaml_next_to_their_documents():
    import yaml

    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted(OFFLINE_TASKS)
    for name in OFFLINE_TASKS:
        text = (TASKS_DIR / f"{name}.yaml").read_text().replace("!function ", "")  # lm-eval's own YAML tag
        config = yaml.safe_load(text)
        assert config["task"] == name and config["dataset_kwargs"]["data_files"]["test"] == f"{name}.jsonl"
    mc = task_docs("pydoc_mc")
    assert 200 <= len(mc) <= 500 and len({d["id"] for d in mc}) == len(mc)
    for d in mc:
        assert len(d["choices"]) == 4 == len(set(d["choices"])) and 0 <= d["gold"] < 4
        assert not any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", d["docstring"], re.IGNORECASE)
                       for name in d["choices"]), d  # every candidate name is masked
    assert 200 <= len(task_docs("pydoc_cloze")) <= 500


def test_mc_modules_share_nothing_with_the_course_corpora():
    assert not set(build.MC_MODULES) & set(dl.data.STDLIB_PACKAGES)
    with pytest.raises(ValueError, match=r"modules \['json'\] are in the stdlib-code corpus"):
        build.build_mc_docs(modules=("json", "math"))


def test_cloze_documents_come_from_the_validation_split_only():
    from distill_lab.data import load_corpus

    validation, test = load_corpus("pydoc", "validation"), load_corpus("pydoc", "test")
    flat = " ".join(validation.split())
    for d in task_docs("pydoc_cloze")[:50]:
        assert d["id"].startswith("validation-") and f"{d['context']} {d['target']}" in flat
        assert d["context"][-60:] not in " ".join(test.split())


def test_committed_task_files_equal_a_fresh_build():
    source = json.loads((TASKS_DIR / "source.json").read_text())
    fresh = build.build_files()
    assert fresh == build.build_files()  # the same bytes twice in a row
    here = ".".join(map(str, sys.version_info[:3]))
    if here != source["python"]:
        pytest.skip(f"the task files were built on Python {source['python']}, this is {here}: another Python's "
                    f"docstrings and pydoc topics give other documents")
    stale = [name for name, text in fresh.items() if (TASKS_DIR / name).read_text(encoding="utf-8") != text]
    assert not stale, f"{stale} differ from a fresh build: run python -m distill_lab.evaluate.tasks.build"
