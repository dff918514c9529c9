"""distill_lab.hardware: measured bf16 / kernel choices, their cache, and bf16='auto' everywhere.

The clock is injected (no timed tests): a fake timer returns chosen milliseconds per candidate.
"""

import json

import pytest
import torch

from distill_lab import hardware


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """A private cache folder, no forcing env var, nothing memoized."""
    monkeypatch.setenv("DISTILL_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv(hardware.ENV_BF16, raising=False)
    hardware.clear_memo()
    yield
    hardware.clear_memo()


def fake_timer(bf16_ms: float, fp32_ms: float = 10.0, kernel_ms: float = 5.0):
    """A timer that runs nothing and reports fixed times: bf16 candidate, fp32, every quantized kernel."""
    def timer(fns, repeats, deadline):
        return {name: fp32_ms if name == "fp32" else bf16_ms if name == "bf16" else kernel_ms for name in fns}
    return timer


def idle():
    return False, 0.1


def loaded():
    return True, 9.0


def counting_measure(bf16_ms: float, calls: list, load=idle):
    def measure():
        calls.append(1)
        return hardware.measure(timer=fake_timer(bf16_ms), load=load)
    return measure


@pytest.mark.parametrize("bf16_ms, chosen", [(20.0, False),  # bf16 slower (the Intel Xeon case)
                                             (9.5, False),  # faster, but within the noise margin
                                             (4.0, True)])  # clearly faster (the AMD EPYC case)
def test_auto_follows_the_measured_speed(bf16_ms, chosen):
    calls = []
    assert hardware.resolve_bf16("auto", "cpu", measure_fn=counting_measure(bf16_ms, calls)) is chosen
    assert calls == [1]


def test_busy_machine_needs_a_larger_margin_and_is_not_stored(tmp_path, capsys):
    calls = []
    # 1.3x faster: enough on an idle machine, not on a busy one
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(10 / 1.3, calls, loaded)) is False
    assert "busy" in capsys.readouterr().err
    assert not (tmp_path / hardware.CACHE_FILE).exists()
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(10 / 1.3, calls, idle)) is False  # memo
    hardware.clear_memo()
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(10 / 1.3, calls, idle)) is True
    assert len(calls) == 2


def phase_timer(prefill_bf16_ms: float, decode_bf16_ms: float, fp32_ms: float = 10.0):
    """A fake timer: the first call is the prefill block, the second the decode block."""
    calls = []

    def timer(fns, repeats, deadline):
        calls.append(1)
        return {"fp32": fp32_ms, "bf16": prefill_bf16_ms if len(calls) == 1 else decode_bf16_ms}
    return timer


@pytest.mark.parametrize("prefill_ms, decode_ms", [(4.0, 20.0), (20.0, 4.0), (4.0, 4.0), (20.0, 20.0)])
def test_bf16_is_chosen_per_phase(prefill_ms, decode_ms):
    """Issue 27: bf16 autocast can win at prefill and lose at decode (the AMD EPYC: 1.96x and 0.63x), or the reverse."""
    entry = hardware.measure(timer=phase_timer(prefill_ms, decode_ms), load=idle)
    assert [r["phase"] for r in entry["rows"]] == ["prefill", "decode"]
    assert entry["choices"] == {"bf16": prefill_ms < 10.0, "bf16_decode": decode_ms < 10.0}
    hardware._MEMO[(hardware.machine_key(), "bf16")] = entry
    assert hardware.resolve_bf16("auto", "cpu", phase="prefill") is (prefill_ms < 10.0)
    assert hardware.resolve_bf16("auto", "cpu", phase="decode") is (decode_ms < 10.0)
    with pytest.raises(ValueError, match="phase='training'; allowed: prefill, decode"):
        hardware.resolve_bf16("auto", "cpu", phase="training")
    table = hardware.format_profile(entry)
    assert entry["cpu"] in table and "at prefill" in table and "at decode" in table


def test_min_ms_calls_a_pathological_candidate_once(monkeypatch):
    """A kernel whose first call takes seconds (oneDNN on an AMD EPYC at 2048 rows: 23 s) costs one call, not ten."""
    calls = {"slow": 0, "fast": 0}
    clock = {"slow": 2.0, "fast": 0.001}
    monkeypatch.setattr(hardware, "timed", lambda fn: (fn(), clock[fn.__name__])[1])

    def slow():
        calls["slow"] += 1

    def fast():
        calls["fast"] += 1
    ms = hardware.min_ms({"slow": slow, "fast": fast}, repeats=10, deadline=float("inf"))
    assert calls == {"slow": 1, "fast": 11} and ms == {"slow": 2000.0, "fast": 1.0}


@pytest.mark.parametrize("many_ms, one_ms, want", [(7.9, 0.034, True),  # the stall seen on the 2-core VM
                                                   (0.2, 0.034, False),  # fork/join overhead, not a stall
                                                   (0.04, 0.034, False)])
def test_contended_needs_a_large_and_absolute_stall(many_ms, one_ms, want, monkeypatch):
    monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(hardware.torch, "set_num_threads", lambda n: None)
    times = iter([many_ms / 1e3] * 5 + [one_ms / 1e3] * 5)
    monkeypatch.setattr(hardware, "timed", lambda fn: next(times))
    assert hardware.contended(repeats=5) is want


def _stored(tmp_path):
    return json.loads((tmp_path / hardware.CACHE_FILE).read_text())[hardware.machine_key()]


@pytest.mark.parametrize("damage", [{}, {"choices": {}}, {"choices": {"bf16": "yes", "bf16_decode": True}},
                                    {"choices": {"bf16": True, "bf16_decode": True}, "rows": [{"ms": "x"}]},
                                    [1, 2], "text"])
def test_damaged_entry_in_valid_json_is_measured_again(damage, tmp_path, capsys):
    """Issue 28 (9): an entry without its fields crashed doctor (KeyError 'key') and compress (KeyError 'bf16')."""
    (tmp_path / hardware.CACHE_FILE).write_text(json.dumps(
        {hardware.machine_key(): {"schema": hardware.SCHEMA, "bf16": damage}}))
    calls = []
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, calls)) is True
    err = capsys.readouterr().err.strip()
    assert len(calls) == 1 and len(err.splitlines()) == 1 and "damaged 'bf16' entry" in err
    assert _stored(tmp_path)["bf16"]["choices"]["bf16"] is True  # repaired


def test_damaged_entry_is_dropped_even_when_the_new_measurement_is_busy(tmp_path, capsys):
    """Issue 28 (9): `doctor --refresh` on a busy machine could not repair the file; now the damage is removed."""
    (tmp_path / hardware.CACHE_FILE).write_text(json.dumps(
        {hardware.machine_key(): {"schema": hardware.SCHEMA, "bf16": {"choices": 1}}}))
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, [], loaded)) is True
    assert "bf16" not in _stored(tmp_path)
    hardware.clear_memo()
    calls = []
    hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, calls))  # a later idle process measures
    assert calls == [1] and "damaged" not in capsys.readouterr().err.split("busy")[-1]


def test_an_older_schema_is_measured_again(tmp_path):
    (tmp_path / hardware.CACHE_FILE).write_text(json.dumps(
        {hardware.machine_key(): {"schema": 1, "choices": {"bf16": True}, "rows": []}}))
    calls = []
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(20.0, calls)) is False
    assert calls == [1] and _stored(tmp_path)["schema"] == hardware.SCHEMA


@pytest.mark.parametrize("value", ["banana", "2", "maybe"])
def test_a_bad_bf16_env_var_stops_every_command_before_any_work(value, monkeypatch, capsys):
    """Issue 28 (10): DISTILL_LAB_BF16=banana was accepted by doctor; compress failed only when distil began."""
    from distill_lab.__main__ import main

    monkeypatch.setenv(hardware.ENV_BF16, value)
    monkeypatch.setattr(hardware, "measure", lambda: pytest.fail("must not measure"))
    for argv in (["doctor"], ["compress", "--recipe", "nowhere.yaml", "--out", "o"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"DISTILL_LAB_BF16={value!r}" in err and "allowed: 0, 1 or auto" in err


@pytest.mark.parametrize("explicit", [True, False])
def test_explicit_setting_wins_and_measures_nothing(explicit, monkeypatch):
    def boom():
        raise AssertionError("an explicit bf16 must not measure")
    monkeypatch.setenv(hardware.ENV_BF16, "0" if explicit else "1")  # the env var only decides 'auto'
    assert hardware.resolve_bf16(explicit, "cpu", measure_fn=boom) is explicit


@pytest.mark.parametrize("env, want", [("0", False), ("1", True), ("false", False), ("TRUE", True)])
def test_env_var_forces_auto(env, want, monkeypatch):
    monkeypatch.setenv(hardware.ENV_BF16, env)
    assert hardware.resolve_bf16("auto", "cpu", measure_fn=lambda: pytest.fail("must not measure")) is want


def test_bad_values_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="bf16='fast'"):
        hardware.resolve_bf16("fast")
    monkeypatch.setenv(hardware.ENV_BF16, "maybe")
    with pytest.raises(ValueError, match="DISTILL_LAB_BF16='maybe'"):
        hardware.resolve_bf16("auto")


def test_cache_is_keyed_by_cpu_model_and_torch_version(tmp_path, monkeypatch):
    calls = []
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(20.0, calls)) is False
    data = json.loads((tmp_path / hardware.CACHE_FILE).read_text())
    key = hardware.machine_key()
    assert list(data) == [key] and data[key]["bf16"]["choices"]["bf16"] is False
    assert hardware.cpu_model() in key and torch.__version__ in key and f"{torch.get_num_threads()} threads" in key

    hardware.clear_memo()  # a new process: read from the file, no measuring
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, calls)) is False
    assert len(calls) == 1

    monkeypatch.setattr(hardware.torch, "__version__", "9.9.9")  # another torch: measured again
    hardware.clear_memo()
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, calls)) is True
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Some Other CPU")  # another CPU: measured again
    hardware.clear_memo()
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(20.0, calls)) is False
    assert len(calls) == 3
    assert len(json.loads((tmp_path / hardware.CACHE_FILE).read_text())) == 3
    assert [p.name for p in tmp_path.iterdir()] == [hardware.CACHE_FILE]  # no temp file left behind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_measured_again_with_one_line(content, tmp_path, capsys):
    (tmp_path / hardware.CACHE_FILE).write_text(content)
    calls = []
    assert hardware.resolve_bf16("auto", measure_fn=counting_measure(4.0, calls)) is True
    err = capsys.readouterr().err.strip()
    assert len(calls) == 1 and len(err.splitlines()) == 1 and "measuring this machine again" in err
    assert _stored(tmp_path)["bf16"]["choices"]["bf16"]


def test_cuda_auto_does_not_measure_the_cpu():
    want = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert hardware.resolve_bf16("auto", "cuda", measure_fn=lambda: pytest.fail("measured")) is want


def test_callers_accept_auto_and_reject_nonsense(monkeypatch):
    from distill_lab.distillation import TrainConfig
    from distill_lab.pipeline import DistilStep

    assert TrainConfig(teacher_bf16="auto", bf16="auto").teacher_bf16 == "auto"
    with pytest.raises(ValueError, match="TrainConfig.teacher_bf16"):
        TrainConfig(teacher_bf16="yes please")
    assert DistilStep().bf16 == "auto"
    with pytest.raises(ValueError, match="bf16"):
        DistilStep(bf16="fast")


def test_teacher_cache_records_the_resolved_choice(tiny, monkeypatch):
    from distill_lab.distillation import cache_teacher_logits

    monkeypatch.setenv(hardware.ENV_BF16, "0")
    windows = torch.randint(0, tiny.config.vocab_size, (2, 8))
    cache = cache_teacher_logits(tiny, windows, k=4, batch_size=2, progress=False)
    assert cache.meta["bf16"] is False


def test_doctor_prints_the_table_and_where_it_is_stored(tmp_path, monkeypatch, capsys):
    from distill_lab.__main__ import main

    from distill_lab.quantization import dispatch

    monkeypatch.setattr(hardware, "measure", _fake_measure)
    dispatch.kernel_profile(measure_fn=_fake_kernels)  # stored, as a first run would
    monkeypatch.setattr(dispatch, "measure_kernels", lambda: pytest.fail("measured"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "ISA flags:" in out and "threads" in out
    assert "bf16='auto' means: fp32" in out and str(tmp_path / hardware.CACHE_FILE) in out
    assert main(["doctor", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bf16"]["choices"]["bf16"] is False and doc["kernels"]["choices"]["w8a8"]["prefill"] == "int_mm"


_real_measure = hardware.measure


def _fake_measure():
    return _real_measure(timer=fake_timer(20.0), load=idle)


def _fake_kernels():
    from distill_lab.quantization import dispatch

    def timer(fns, repeats, deadline):
        return {name: 10.0 if name == "fp32" else 5.0 for name in fns}
    return dispatch.measure_kernels(timer=timer, load=idle)


def test_min_ms_keeps_every_round_and_the_table_prints_their_spread(monkeypatch):
    """The choice is judged by the fastest round; the table also shows the per-round speed-ups' IQR."""
    ticks = iter([0.002, 0.001] + [0.002, 0.001, 0.002, 0.0008, 0.002, 0.0005, 0.002, 0.001, 0.002, 0.001])
    monkeypatch.setattr(hardware, "timed", lambda fn: next(ticks))
    ms = hardware.min_ms({"fp32": lambda: None, "bf16": lambda: None}, repeats=1, deadline=0.0)  # >= MIN_ROUNDS
    assert len(ms.rounds["fp32"]) == 5 and ms == {"fp32": 2.0, "bf16": 0.5}
    assert hardware.round_spread(ms, "bf16") == pytest.approx([2.0, 2.5])  # per-round 2, 2.5, 4, 2, 2
    assert hardware.round_spread({"fp32": 1.0, "bf16": 0.5}, "bf16") is None  # an injected timer keeps no rounds
    rows = [{"what": "w", "phase": "prefill", "path": "bf16", "fp32_ms": 2.0, "ms": 0.5, "speed": 4.0,
             "spread": [2.0, 2.5]}]
    assert "2.00–2.50" in "\n".join(hardware.format_rows(rows, lambda r: "yes"))
