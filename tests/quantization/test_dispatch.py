"""quantization.dispatch: each format's kernel path per phase, chosen by (injected) timings on this CPU.

Issue 27: oneDNN's int8 linear passed its correctness probe on an AMD EPYC and ran 3,000x slower than
``_int_mm`` there, so ``make test`` timed out. The clock is injected here, so every CPU's case is
covered on whichever CPU runs the tests: a pathological oneDNN, a fast oneDNN (Xeon with AMX), an int4
kernel slower than dequantizing at prefill, a failing or inexact path, a missing op.
"""

import json

import pytest
import torch
from torch import nn

from distill_lab import hardware
from distill_lab.quantization import dispatch, int4_kernels, kernels
from distill_lab.quantization.modules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """A private cache, measured choices (not the unit tests' fixed ones), nothing memoized."""
    monkeypatch.setenv("DISTILL_LAB_CACHE", str(tmp_path))
    monkeypatch.setenv(dispatch.ENV_KERNELS, "auto")
    hardware.clear_memo()
    yield
    hardware.clear_memo()


def idle():
    return False, 0.1


def timer_from(table: dict, default: float = 10.0, calls: list | None = None):
    """A fake timer: ms per candidate name, by phase when given as {'prefill': ms, 'decode': ms, 'guard': ms}."""
    def timer(fns, repeats, deadline):
        phase = "guard" if repeats == 2 else "prefill" if repeats < 9 else "decode"
        if calls is not None:
            calls.append((phase, sorted(fns)))
        out = {}
        for name in fns:
            v = table.get(name, default)
            out[name] = v.get(phase, v.get("prefill", default)) if isinstance(v, dict) else v
        return out
    return timer


def measure(table: dict, **kw):
    return dispatch.measure_kernels(timer=timer_from(table), load=idle, **kw)


def linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in) * 0.05)
    return lin


def test_a_pathological_onednn_is_dropped_before_it_is_timed_and_never_runs(monkeypatch):
    """The AMD EPYC case: oneDNN exact but ~4,000x slower. Dropped at the guard, and a model never calls it."""
    calls = []
    entry = dispatch.measure_kernels(timer=timer_from({"w8a8.onednn": 4000.0, "fp32": 1.0}, default=0.5, calls=calls),
                                     load=idle, candidates_fn=_fake_candidates(onednn=True))
    assert "w8a8.onednn" in entry["refused"] and "dropped before timing" in entry["refused"]["w8a8.onednn"]
    assert all("w8a8.onednn" not in names for phase, names in calls if phase != "guard")  # never timed at size
    assert entry["choices"]["w8a8"] == {"prefill": "int_mm", "decode": "int_mm"}
    hardware._MEMO[(hardware.machine_key(), "kernels")] = entry
    monkeypatch.setattr("distill_lab.quantization.modules.w8a8_onednn",
                        lambda *a, **k: pytest.fail("oneDNN ran although it was measured slow"))
    mod = Int8DynamicLinear.from_float(linear(576, 1536))
    with torch.no_grad():
        mod(torch.randn(512, 576))
    assert mod._onednn is None  # never even packed


def test_a_fast_onednn_is_chosen_where_it_wins_and_only_there(monkeypatch):
    """The Xeon-with-AMX case: oneDNN beats _int_mm + epilogue at prefill, loses at decode."""
    entry = measure({"fp32": 10.0, "w8a8.int_mm": {"prefill": 4.0, "decode": 0.05, "guard": 1.0},
                     "w8a8.onednn": {"prefill": 1.5, "decode": 0.5, "guard": 1.0}},
                    candidates_fn=_fake_candidates(onednn=True))
    assert entry["choices"]["w8a8"] == {"prefill": "onednn", "decode": "int_mm"}
    row = next(r for r in entry["rows"] if r["path"] == "onednn" and r["phase"] == "prefill")
    assert row["speed"] == pytest.approx(10.0 / 1.5) and row["chosen"]


@pytest.mark.parametrize("fmt", ["int4", "int8_weight_only"])
def test_a_slow_kernel_at_prefill_gives_way_to_dequantizing(fmt):
    """The Xeon's int4 prefill at 0.46x fp32: the prefill phase moves to a float GEMM, decode keeps the kernel."""
    entry = measure({"fp32": 10.0, f"{fmt}.kernel": {"prefill": 22.0, "decode": 0.03, "guard": 1.0},
                     f"{fmt}.dequant_bf16": {"prefill": 12.0, "decode": 0.5, "guard": 1.0},
                     f"{fmt}.dequant_fp32": {"prefill": 11.0, "decode": 0.4, "guard": 1.0}},
                    candidates_fn=_fake_candidates())
    assert entry["choices"][fmt] == {"prefill": "dequant_fp32", "decode": "kernel"}
    assert "dequant_fp32" in entry["summary"]


def test_stalling_parallel_kernels_keep_the_fixed_paths_and_are_not_stored(monkeypatch, tmp_path):
    """A 2-core VM where every tiny parallel kernel waits ms for a vCPU: the timings favour single-op paths."""
    monkeypatch.setattr(dispatch, "contended", lambda: True)
    monkeypatch.setattr(dispatch, "busy", idle)
    table = {"fp32": 10.0, "int4.kernel": 22.0, "int4.dequant_bf16": 5.0, "int8_weight_only.kernel": 30.0}
    fake = lambda: dispatch.measure_kernels(timer=timer_from(table), candidates_fn=_fake_candidates())  # noqa: E731
    entry = dispatch.kernel_profile(measure_fn=fake)
    assert entry["distorted"] and entry["busy"] and "fixed paths kept" in entry["summary"]
    assert entry["choices"] == {fmt: dict(ch) for fmt, ch in dispatch.FIXED.items()}
    assert not (tmp_path / hardware.CACHE_FILE).exists()
    assert "stalled" in dispatch.format_kernel_profile(entry)


def test_decode_times_only_the_integer_paths():
    calls = []
    dispatch.measure_kernels(timer=timer_from({}, calls=calls), load=idle, candidates_fn=_fake_candidates())
    decode = next(names for phase, names in calls if phase == "decode")
    assert "int4.kernel" in decode and not [n for n in decode if "dequant" in n]


def test_a_dequantizing_path_serves_only_prefills_past_its_crossover(monkeypatch):
    """Review of issue 27: dequantizing pays a fixed cost per call, so a 256-token prompt must keep the kernel.

    Kernel: 0.25 ms at 16 rows, 10.7 ms at 1024; dequant_bf16: 3.4 and 7.5 ms (this AMD EPYC's one Linear).
    Straight lines through both cross at (3.4 - 0.25 + 16 b_k - 16 b_d) / (b_k - b_d), about 515 rows.
    """
    table = {"fp32": {"guard": 0.5, "prefill": 9.6, "decode": 0.07},
             "int4.kernel": {"guard": 0.25, "prefill": 10.7, "decode": 0.03},
             "int4.dequant_bf16": {"guard": 3.4, "prefill": 7.5}, "int4.dequant_fp32": {"guard": 3.0, "prefill": 12.5}}
    entry = measure(table, candidates_fn=_fake_candidates())
    b_k, b_d = (10.7 - 0.25) / 1008, (7.5 - 3.4) / 1008
    want = (3.4 - 16 * b_d - 0.25 + 16 * b_k) / (b_k - b_d)
    assert entry["choices"]["int4"] == {"prefill": "dequant_bf16", "decode": "kernel"}
    assert abs(entry["min_rows"]["int4"] - want) <= 1 and 400 < entry["min_rows"]["int4"] < 600
    hardware._MEMO[(hardware.machine_key(), "kernels")] = entry
    assert [dispatch.kernel_path("int4", r) for r in (1, 16, 17, 256, 514, 600, 2048)] == \
        ["kernel"] * 4 + [dispatch.kernel_path("int4", 514)] + ["dequant_bf16"] * 2
    assert "from 5" in dispatch.format_kernel_profile(entry)  # "prefill dequant_bf16 from 5xx rows (below: kernel)"
    monkeypatch.setenv(dispatch.ENV_KERNELS, "int4.prefill=dequant_bf16")  # forced: the whole phase
    assert dispatch.kernel_path("int4", 17) == "dequant_bf16"


def test_a_path_cheaper_per_row_only_by_noise_serves_only_calls_as_large_as_timed():
    entry = measure({"int4.kernel": {"guard": 0.2, "prefill": 10.0}, "int4.dequant_bf16": {"guard": 0.2,
                                                                                        "prefill": 9.0}},
                    candidates_fn=_fake_candidates())
    assert entry["choices"]["int4"]["prefill"] == "dequant_bf16" and entry["min_rows"]["int4"] > 16


def test_the_measurement_is_fp32_even_inside_a_callers_autocast():
    seen = []

    def build(rows):
        c = _fake_candidates()(rows)
        fp32 = c["fp32"]["fp32"]
        c["fp32"]["fp32"] = lambda: (seen.append(torch.is_autocast_enabled("cpu")), fp32())[1]
        return c
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dispatch.measure_kernels(timer=lambda fns, r, d: {n: (fn(), 1.0)[1] for n, fn in fns.items()}, load=idle,
                                 candidates_fn=build)
    assert seen and not any(seen)


def test_a_path_within_the_margin_does_not_replace_the_fixed_one():
    fixed = dispatch.FIXED["int4"]["prefill"]
    entry = measure({"int4.kernel": 10.0, "int4.dequant_bf16": 10.0 / 1.03, "int4.dequant_fp32": 20.0},
                    candidates_fn=_fake_candidates())
    assert entry["choices"]["int4"]["prefill"] == fixed  # 3 % faster is noise, not a reason to move


def test_paths_that_fail_or_give_other_numbers_are_refused():
    entry = measure({"w8a8.onednn": 0.1, "int4.dequant_bf16": 0.1, "int4.dequant_fp32": 0.1},
                    candidates_fn=_fake_candidates(onednn="wrong", int4_bf16="raises", int4_fp32="wrong"))
    refused = entry["refused"]
    assert "other numbers than _int_mm" in refused["w8a8.onednn"]
    assert "fails here (RuntimeError" in refused["int4.dequant_bf16"]
    assert "relative error" in refused["int4.dequant_fp32"]
    assert entry["choices"]["w8a8"]["prefill"] == "int_mm" and entry["choices"]["int4"]["prefill"] == "kernel"
    assert not [r for r in entry["rows"] if f"{r['format']}.{r['path']}" in refused]


def test_a_missing_op_is_simply_not_a_candidate():
    entry = measure({"fp32": 10.0}, candidates_fn=_fake_candidates(onednn=False, int4=False))
    assert entry["choices"]["w8a8"] == {"prefill": "int_mm", "decode": "int_mm"}
    assert "int4" not in entry["choices"] and dispatch._kernels_problem(entry) is None
    hardware._MEMO[(hardware.machine_key(), "kernels")] = entry
    assert dispatch.kernel_paths()["int4"] == dispatch.FIXED["int4"]  # nothing measured: the fixed path


def test_the_real_measurement_runs_here_within_its_budget():
    """On this CPU, real kernels, real clock: every format measured, the probe exact, a few seconds at most."""
    entry = dispatch.kernel_profile()
    assert dispatch._kernels_problem(entry) is None
    assert entry["measured_s"] < 15
    assert set(entry["choices"]["w8a8"].values()) <= {"int_mm", "onednn"}
    text = dispatch.format_kernel_profile(entry)
    assert "w8a8" in text and "int4" in text and "decode" in text
    if not entry["busy"]:  # busy measurements are used in this process only
        stored = json.loads(hardware.cache_path().read_text())[hardware.machine_key()]
        assert stored["kernels"]["choices"] == entry["choices"]


# ----------------------------------------------------------------------------- same numbers on every path
@pytest.mark.parametrize("rows", [1, 40])
def test_every_int4_path_gives_the_kernels_numbers(rows, monkeypatch):
    mod = Int4WeightOnlyLinear.from_float(linear(128, 64, bias=True), 64)
    x = torch.randn(rows, 128)
    outs = {}
    for path in dispatch.FORMATS["int4"]:
        monkeypatch.setenv(dispatch.ENV_KERNELS, f"fixed,int4.*={path}")
        with torch.no_grad():
            outs[path] = mod(x).float()
    ref = torch.nn.functional.linear(x, mod.dequantized_weight(), mod.bias)
    for path, y in outs.items():
        assert (y - ref).norm() < 1e-2 * ref.norm(), path
    assert (outs["dequant_fp32"] - ref).norm() < 1e-5 * ref.norm()  # fp32 dequant is the exact weight


@pytest.mark.parametrize("layout", ["cpu", "plain"])
@pytest.mark.parametrize("n, k", [(64, 128), (1536, 576), (192, 576)])
def test_dequantizing_from_the_packed_layout_is_exact(layout, n, k):
    if layout == "cpu" and int4_kernels.int4_layout_for(torch.device("cpu"), n, k, 64) != "cpu":
        pytest.skip("no CPU int4 kernel in this build")
    codes, sz = int4_kernels.int4_codes_and_scales(torch.randn(n, k), 64)
    sz = sz.to(torch.bfloat16)
    packed = int4_kernels.to_kernel_layout(codes, layout)
    want = int4_kernels.dequantize_int4(codes, 64, sz, torch.float32)
    got = int4_kernels.int4_dequantize_packed(packed, layout, 64, sz, n, k, torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 40])
def test_every_int8_weight_only_path_gives_the_same_numbers(rows, monkeypatch):
    mod = Int8WeightOnlyLinear.from_float(linear(64, 48))
    x = torch.randn(rows, 64)
    ref = torch.nn.functional.linear(x, mod.dequantized_weight())
    for path in dispatch.FORMATS["int8_weight_only"]:
        monkeypatch.setenv(dispatch.ENV_KERNELS, f"fixed,int8_weight_only.*={path}")
        with torch.no_grad():
            y = mod(x).float()
        assert (y - ref).norm() < 1e-2 * ref.norm(), path


def test_w8a8_paths_are_bit_identical(monkeypatch):
    if kernels.onednn_int8_pack(torch.ones(4, 8, dtype=torch.int8)) is None:
        pytest.skip("oneDNN's int8 linear is not available (or not exact) on this CPU")
    mod = Int8DynamicLinear.from_float(linear(64, 1024, bias=True))
    x = torch.randn(160, 64) * 2
    outs = []
    for path in dispatch.FORMATS["w8a8"]:
        monkeypatch.setenv(dispatch.ENV_KERNELS, f"fixed,w8a8.*={path}")
        with torch.no_grad():
            outs.append(mod(x))
    assert torch.equal(outs[0], outs[1]) and mod._onednn is not None and mod._onednn[1] is not None


# ----------------------------------------------------------------------------- the environment and the summary
@pytest.mark.parametrize("value", ["turbo", "int4.prefill", "int4.lunch=kernel", "w8a8.prefill=kernel",
                                   "int5.*=kernel"])
def test_a_bad_kernels_env_var_is_one_clear_error(value, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_KERNELS, value)
    with pytest.raises(ValueError, match=r"DISTILL_LAB_KERNELS=.*allowed: 'auto', 'fixed'"):
        dispatch.check_env()


def test_fixed_measures_nothing_and_forced_paths_win(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_KERNELS, "fixed")
    assert dispatch.kernel_paths(measure_fn=lambda: pytest.fail("measured")) == dispatch.FIXED
    hardware._MEMO[(hardware.machine_key(), "kernels")] = measure({}, candidates_fn=_fake_candidates())
    monkeypatch.setenv(dispatch.ENV_KERNELS, "fixed, int4.prefill=dequant_bf16")
    assert dispatch.kernel_paths(measure_fn=lambda: pytest.fail("measured"))["int4"]["prefill"] == "dequant_bf16"
    monkeypatch.setenv(dispatch.ENV_KERNELS, "int4.prefill=dequant_bf16, w8a8.*=int_mm")
    paths = dispatch.kernel_paths()
    assert paths["int4"]["prefill"] == "dequant_bf16" and paths["w8a8"] == {"prefill": "int_mm", "decode": "int_mm"}
    assert dispatch.kernel_path("int4", 1) == paths["int4"]["decode"] and dispatch.kernel_path("int4", 17) == \
        "dequant_bf16"
    assert dispatch.kernel_path("int4", 17, "meta") == dispatch.FIXED["int4"]["prefill"]  # other devices: fixed
    assert [dispatch.kernel_path("int8_weight_only", r, "meta") for r in (32, 33)] == ["kernel", "dequant_bf16"]


def test_the_quantization_summary_says_which_phase_left_its_kernel(tiny, monkeypatch):
    from distill_lab.quantization import Int4WeightOnlyConfig, quantize_

    monkeypatch.setenv(dispatch.ENV_KERNELS, "int4.prefill=dequant_bf16")
    hardware._MEMO[(hardware.machine_key(), "kernels")] = measure({}, candidates_fn=_fake_candidates())
    summary = quantize_(tiny, Int4WeightOnlyConfig(group_size=32))
    assert summary.paths["int4_weight_only"] == {"prefill": "dequant_bf16"}
    assert "int4_weight_only prefill runs dequant_bf16 on this CPU, not kernel" in repr(summary)


def test_an_older_kernels_entry_is_measured_again_quietly(tmp_path, capsys):
    (tmp_path / hardware.CACHE_FILE).write_text(json.dumps(
        {hardware.machine_key(): {"schema": hardware.SCHEMA, "kernels": {"schema": 1, "choices": {}}}}))
    entry = dispatch.kernel_profile(measure_fn=lambda: measure({}, candidates_fn=_fake_candidates()))
    assert entry["schema"] == dispatch.SCHEMA and "damaged" not in capsys.readouterr().err


def test_a_damaged_kernels_entry_is_measured_again(tmp_path, capsys):
    (tmp_path / hardware.CACHE_FILE).write_text(json.dumps(
        {hardware.machine_key(): {"schema": hardware.SCHEMA, "kernels": {"schema": dispatch.SCHEMA, "choices": {
            "int4": {"prefill": "teleport"}}}}}))
    entry = dispatch.kernel_profile(measure_fn=lambda: measure({}, candidates_fn=_fake_candidates()))
    assert "damaged 'kernels' entry" in capsys.readouterr().err and dispatch._kernels_problem(entry) is None


# ----------------------------------------------------------------------------- fake kernels
def _fake_candidates(onednn=True, int4=True, int4_bf16="ok", int4_fp32="ok"):
    """candidates_fn for measure_kernels: tiny real tensors, with paths that can be made to fail or lie."""
    def build(rows):
        x = torch.ones(rows, 4)
        good = lambda: x @ torch.ones(4, 3)  # noqa: E731
        wrong = lambda: good() + 1  # noqa: E731

        def raises():
            raise RuntimeError("no kernel for this shape")

        pick = {"ok": good, True: good, "wrong": wrong, "raises": raises}
        out = {"fp32": {"fp32": good}, "raw": {"w8a8": good, "int8_weight_only": good, "int4": good},
               "w8a8": {"int_mm": good}, "int8_weight_only": {p: good for p in dispatch.FORMATS["int8_weight_only"]}}
        if onednn:
            out["w8a8"]["onednn"] = pick[onednn]
        if int4:
            out["int4"] = {"kernel": good, "dequant_bf16": pick[int4_bf16], "dequant_fp32": pick[int4_fp32]}
        return out
    return build
