"""Which kernel path each quantized format takes on this CPU, per phase, chosen by timing the paths here.

A correctness probe is not enough. oneDNN's int8 linear gives exactly ``torch._int_mm``'s integers
on an Intel Xeon with AMX and on an AMD EPYC; one 576 -> 1536 layer runs in at most 1.22x the raw
kernel's time on the first (2048 rows) and in 3,081 ms against 0.89 ms on the second (256 rows). Likewise
PyTorch's int4 kernel is a fast GEMV at decode but slower than the fp32 GEMM at prefill on both
CPUs. So every path that passes its probe is timed at the teacher's shapes, per phase, and the
fastest is used: the autotuning of ATLAS (Whaley & Dongarra, 1998) and FFTW's "wisdom" (Frigo &
Johnson, 2005), as ``hardware`` does for bf16. Paths of one format hold the same weights; they
give the same numbers bit for bit (W8A8) or within bf16 rounding (the dequantizing paths).

    format            paths (CPU)
    w8a8              int_mm (``torch._int_mm`` + in-place epilogue), onednn (scales inside the kernel)
    int8_weight_only  kernel (``_weight_int8pack_mm``), dequant_bf16, dequant_fp32
    int4              kernel (``_weight_int4pack_mm_for_cpu``), dequant_bf16, dequant_fp32

A call of at most ``DECODE_MAX_ROWS`` rows is in phase 'decode' (one token per sequence), a larger
one in 'prefill'; the phases are timed at 1 row and at ``PREFILL_ROWS`` rows of 576 -> 1536 (the
teacher's gate/up projections). A dequantizing path pays a fixed cost per call, so it serves only
calls from the rows where its fitted time crosses the decode path's (``min_rows``, from the
timings at ``GUARD_ROWS`` and ``PREFILL_ROWS``); smaller prefills keep the integer kernel. The choice is stored in ``hardware.json`` (section ``kernels``),
keyed by CPU model, torch version and thread count. ``DISTILL_LAB_KERNELS`` overrides it:

    auto                                     measured here (the default)
    fixed                                    the integer kernel wherever it applies, no timing (unit tests)
    int4.prefill=dequant_bf16,w8a8.*=int_mm  named paths forced, the rest measured ("fixed,..." the rest fixed)
"""

from __future__ import annotations

import functools
import math
import os
import time

import torch
import torch.nn.functional as F

from ..hardware import (PHASES, STALE, busy, cached_section, contended, cpu_model, format_rows, isa_flags,
                        machine_key, min_ms, round_spread, rows_problem)
from ..timing import stopwatch
from .kernels import int8_weight_only_mm, onednn_int8_pack, quantize_activations, w8a8_int_mm_cpu, w8a8_onednn
from .int4_kernels import int4_codes_and_scales, int4_layout_for, int4_linear, to_kernel_layout

__all__ = ["DECODE_MAX_ROWS", "ENV_KERNELS", "FIXED", "FORMATS", "PATH_MARGIN", "PREFILL_ROWS", "check_env",
           "format_kernel_profile", "kernel_path", "kernel_paths", "kernel_profile", "measure_kernels", "phase_of"]

ENV_KERNELS = "DISTILL_LAB_KERNELS"
FORMATS = {"w8a8": ("int_mm", "onednn"),
           "int8_weight_only": ("kernel", "dequant_bf16", "dequant_fp32"),
           "int4": ("kernel", "dequant_bf16", "dequant_fp32")}
# without a measurement (DISTILL_LAB_KERNELS=fixed, CUDA): the rule before issue 27 minus oneDNN (int8 weight-only:
# its kernel up to FIXED_MIN_ROWS - 1 rows, then bf16)
FIXED = {"w8a8": {"prefill": "int_mm", "decode": "int_mm"},
         "int8_weight_only": {"prefill": "dequant_bf16", "decode": "kernel"},
         "int4": {"prefill": "kernel", "decode": "kernel"}}
FIXED_MIN_ROWS = {"int8_weight_only": 33}  # rows from which the fixed prefill path applies (kernels.INT8_PACK_MAX_ROWS + 1)
RAW = {"w8a8": "raw _int_mm", "int8_weight_only": "raw int8pack", "int4": "raw int4pack"}  # the kernels alone
DECODE_MAX_ROWS = 16  # rows per call up to which the 'decode' choice applies
PREFILL_ROWS = 1024  # rows of the timed prefill call (4 x 256 tokens: a dequantizing path pays per call)
SHAPE = (576, 1536)  # K -> N of the timed layer: the teacher's gate/up projections
GROUP = 64  # int4 group size timed (the course's g64)
PATH_MARGIN = 1.05  # another path must beat the fixed one by 5 % to replace it ...
BUSY_PATH_MARGIN = 1.10  # ... and by 10 % when the machine was busy while measuring
GUARD_ROWS = 16  # each candidate is first timed at this size (fastest of 2 calls) ...
GUARD_FACTOR = 50.0  # ... and dropped when this many times slower than its format's fastest path there
GUARD_MAX_MS = 150.0  # ... or slower than this (a few ms idle, ~80 ms on a contended 2-core VM; oneDNN on AMD: ~300 ms)
DECODE_PATHS = {"w8a8": ("int_mm",), "int8_weight_only": ("kernel",), "int4": ("kernel",)}  # at 1 row, dequantizing
# the whole weight for one token cannot win (it could only look faster in a distorted timing), and oneDNN costs
# milliseconds per call below W8A8_ONEDNN_MIN_ROWS rows, where the layer never calls it
SLOW_RATIO = 0.9  # a chosen path slower than this times fp32 is reported (there is no faster one with its numbers)
BUDGET_S = 3.0  # the measurement stops repeating after this long (about 1-2 s when idle)
SCHEMA = 3  # bump when the measurement changes meaning (2: min_rows, 3: spread)


def phase_of(rows: int) -> str:
    """'decode' for a call of at most ``DECODE_MAX_ROWS`` rows, else 'prefill'."""
    return "decode" if rows <= DECODE_MAX_ROWS else "prefill"


# ----------------------------------------------------------------------------- the candidates
def _layers(k: int, n: int, seed: int = 0) -> dict:
    """One fp32 weight (N, K) in every format's storage: int8 codes + scales, int4 packed + scales/zeros."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05  # (N, K)
    scales = w.abs().amax(-1) / 127  # (N,)
    w8 = torch.round(w / scales[:, None]).to(torch.int8)  # (N, K)
    codes, sz = int4_codes_and_scales(w, GROUP)
    layout = int4_layout_for(torch.device("cpu"), n, k, GROUP)
    return {"w": w, "w8": w8, "scales": scales, "packed4": to_kernel_layout(codes, layout),
            "sz": sz.to(torch.bfloat16).contiguous(),
            "layout": layout, "onednn": onednn_int8_pack(w8)}


def candidates(rows: int, k: int = SHAPE[0], n: int = SHAPE[1], layers: dict | None = None) -> dict:
    """{format: {path: fn}} at (rows, K) -> N on the CPU, plus 'fp32' and each format's raw kernel (for the ratios).

    Only paths that can run here are listed: oneDNN only when its probe gave ``_int_mm``'s exact
    integers (``onednn_int8_pack``), int4 only with the CPU int4 layout.
    """
    L = layers or _layers(k, n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))  # (M, K)
    xb = x.to(torch.bfloat16)
    aten = torch.ops.aten
    out = {"fp32": {"fp32": lambda: F.linear(x, L["w"])}, "raw": {}}
    w8a8 = {"int_mm": lambda: w8a8_int_mm_cpu(x, L["w8"], L["scales"])}
    if L["onednn"] is not None:
        w8a8["onednn"] = lambda: w8a8_onednn(x, L["onednn"], L["scales"])
    out["w8a8"] = w8a8
    if hasattr(torch, "_int_mm"):
        xq, _ = quantize_activations(x)
        out["raw"]["w8a8"] = lambda: torch._int_mm(xq, L["w8"].t())
    if hasattr(aten, "_weight_int8pack_mm") and k % 16 == 0:
        s8 = L["scales"].to(torch.bfloat16)
        out["int8_weight_only"] = {p: (lambda p=p: int8_weight_only_mm(x, L["w8"], L["scales"], path=p))
                                   for p in FORMATS["int8_weight_only"]}
        out["raw"]["int8_weight_only"] = lambda: aten._weight_int8pack_mm(xb, L["w8"], s8)
    if L["layout"] == "cpu":
        out["int4"] = {p: (lambda p=p: int4_linear(x, L["packed4"], GROUP, L["sz"], "cpu", n, p))
                       for p in FORMATS["int4"]}
        out["raw"]["int4"] = lambda: aten._weight_int4pack_mm_for_cpu(xb, L["packed4"], GROUP, L["sz"])
    return out


def _probe(fmt: str, fns: dict) -> dict[str, str]:
    """{path: why refused} for paths that raise or give other numbers than the format's fixed path."""
    refused, ref = {}, None
    base = FIXED[fmt]["decode"] if fmt != "int8_weight_only" else "dequant_fp32"
    if base not in fns:
        return {p: f"the reference path {base} is not available here" for p in fns}
    try:
        ref = fns[base]().float()
    except (RuntimeError, NotImplementedError) as err:
        return {p: f"the reference path {base} fails here ({type(err).__name__})" for p in fns}
    for path, fn in fns.items():
        try:
            got = fn().float()
        except (RuntimeError, NotImplementedError) as err:
            refused[path] = f"fails here ({type(err).__name__}: {str(err)[:60]})"
            continue
        if fmt == "w8a8":  # the same integers and the same fp32 multiplies: equal bit for bit
            if not torch.equal(got, ref):
                refused[path] = "gives other numbers than _int_mm"
        elif (got - ref).norm() > 1e-2 * ref.norm():  # within bf16 rounding of the weights and inputs
            refused[path] = f"relative error {float((got - ref).norm() / ref.norm()):.1e} vs the reference"
    return refused


# ----------------------------------------------------------------------------- the measurement
def measure_kernels(repeats: int = 7, budget_s: float = BUDGET_S, timer=None, load=None,
                    candidates_fn=None) -> dict:
    """Time every format's paths here at decode (1 row) and prefill (``PREFILL_ROWS``); return rows and choices.

    Each path is first probed (same numbers as the format's reference path) and called once at
    ``GUARD_ROWS`` rows: a path ``GUARD_FACTOR`` times slower than its format's fastest there, or
    slower than ``GUARD_MAX_MS``, is dropped before it can cost seconds. Decode times only the integer
    paths (``DECODE_PATHS``). The fastest remaining path is chosen; the fixed path (``FIXED``) stays unless
    another beats it by ``PATH_MARGIN`` (noise cannot move a machine off it). ``timer(fns,
    repeats, deadline) -> {name: ms}``, ``load() -> (busy, load)`` and ``candidates_fn(rows)`` replace
    the clock, the load check and the kernels (tests inject a slow oneDNN this way). When tiny
    parallel kernels stall on this machine right now (``hardware.contended``), the timings rank paths
    by how many ops they launch: the entry is marked busy (not stored) and keeps the fixed paths.
    """
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # fp32 means fp32, even inside a caller's autocast
        return _measure(repeats, budget_s, timer, load, candidates_fn)


def _measure(repeats, budget_s, timer, load, candidates_fn) -> dict:
    timer, load_fn, cands = timer or min_ms, load or busy, candidates_fn or candidates
    elapsed = stopwatch()
    t0 = elapsed.start  # deadlines below are perf_counter readings
    distorted = load is None and contended()  # see hardware.contended; an injected load means injected timings
    was_busy, load = load_fn()
    layers = None if candidates_fn else _layers(*SHAPE)
    build = cands if candidates_fn else functools.partial(candidates, layers=layers)
    guard = build(GUARD_ROWS)
    refused: dict[str, str] = {}
    for fmt in FORMATS:
        for path, why in _probe(fmt, guard.get(fmt, {})).items():
            refused[f"{fmt}.{path}"] = why
    flat = {f"{fmt}.{p}": fn for fmt in FORMATS for p, fn in guard.get(fmt, {}).items()
            if f"{fmt}.{p}" not in refused}
    once = timer({"fp32": guard["fp32"]["fp32"], **flat}, 2, t0 + budget_s)  # {name: ms} at GUARD_ROWS
    for name in flat:
        fastest = min(v for n, v in once.items() if n.split(".")[0] == name.split(".")[0])
        if once[name] > GUARD_FACTOR * fastest or once[name] > GUARD_MAX_MS:
            refused[name] = (f"{once[name]:.1f} ms per call at {GUARD_ROWS} rows, {once[name] / fastest:.0f}x the "
                             f"fastest {name.split('.')[0]} path, {once[name] / once['fp32']:.0f}x fp32: dropped "
                             f"before timing")
    rows, choices, prefill_ms = [], {fmt: {} for fmt in FORMATS}, {}
    k, n = SHAPE
    for i, phase in enumerate(PHASES):
        m = PREFILL_ROWS if phase == "prefill" else 1
        c = build(m)
        fns = {"fp32": c["fp32"]["fp32"]}
        fns.update({f"{fmt}.{p}": fn for fmt in FORMATS for p, fn in c.get(fmt, {}).items()
                    if f"{fmt}.{p}" not in refused and (phase == "prefill" or p in DECODE_PATHS[fmt])})
        fns.update({f"raw.{fmt}": fn for fmt, fn in c.get("raw", {}).items()})
        reps = max(3, repeats // 2) if phase == "prefill" else 3 * repeats
        ms = timer(fns, reps, t0 + budget_s * (i + 1) / len(PHASES))
        if phase == "prefill":
            prefill_ms = ms
        for fmt in FORMATS:
            timed = {p: ms[f"{fmt}.{p}"] for p in FORMATS[fmt] if f"{fmt}.{p}" in ms}
            if not timed:
                continue
            fixed = FIXED[fmt][phase]
            best = min(timed, key=timed.get)
            margin = BUSY_PATH_MARGIN if was_busy else PATH_MARGIN
            chosen = fixed if fixed in timed and timed[fixed] <= margin * timed[best] else best
            if distorted and fixed in timed:  # tiny parallel kernels stall here: do not move off the fixed path
                chosen = fixed
            choices[fmt][phase] = chosen
            raw = ms.get(f"raw.{fmt}")
            for p, t in timed.items():
                rows.append({"what": f"{fmt} {m}x{k}->{n}", "format": fmt, "phase": phase, "path": p,
                             "fp32_ms": ms["fp32"], "ms": t, "speed": ms["fp32"] / t,
                             "vs_raw": None if raw is None else t / raw, "chosen": p == chosen,
                             "spread": round_spread(ms, f"{fmt}.{p}")})
    now_busy, load_after = load_fn()
    was_busy = was_busy or now_busy or distorted
    choices = {fmt: ch for fmt, ch in choices.items() if ch}
    min_rows = {fmt: _crossover(fmt, ch, once, prefill_ms) for fmt, ch in choices.items() if len(ch) == len(PHASES)}
    slower = [f"{r['format']} {r['phase']} {r['speed']:.2f}x" for r in rows if r["chosen"] and r["speed"] < SLOW_RATIO]
    summary = "; ".join(f"{fmt} {ph} {p}" for fmt, ch in choices.items() for ph, p in ch.items()
                        if p != FIXED[fmt][ph]) or "the fixed paths everywhere"
    return {"schema": SCHEMA, "key": machine_key(), "cpu": cpu_model(), "isa": isa_flags(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows, "refused": refused, "choices": choices, "min_rows": min_rows,
            "slower_than_fp32": slower,
            "summary": f"kernel paths: {summary}" + (" (tiny parallel kernels stalled: fixed paths kept)"
                                                    if distorted else ""),
            "distorted": distorted, "busy": was_busy, "load": max(load, load_after),
            "cores": os.cpu_count(), "measured_s": elapsed(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _crossover(fmt: str, chosen: dict, guard_ms: dict, prefill_ms: dict) -> int:
    """Rows from which ``fmt``'s prefill path beats its decode path: each path's time fitted as ``a + b·rows``
    through its timings at ``GUARD_ROWS`` and ``PREFILL_ROWS`` (a dequantizing path pays a fixed cost per call,
    so below the crossover the decode path is faster). Between ``DECODE_MAX_ROWS + 1`` and ``PREFILL_ROWS``."""
    lo, hi = DECODE_MAX_ROWS + 1, PREFILL_ROWS
    p, d = f"{fmt}.{chosen['prefill']}", f"{fmt}.{chosen['decode']}"
    if p == d:
        return lo
    if not all(name in t for name in (p, d) for t in (guard_ms, prefill_ms)):
        return hi  # not measured at both sizes: only calls as large as the one timed take the prefill path
    fit = {}
    for name in (p, d):
        b = (prefill_ms[name] - guard_ms[name]) / (PREFILL_ROWS - GUARD_ROWS)  # ms per row
        fit[name] = (guard_ms[name] - GUARD_ROWS * b, b)
    (a_p, b_p), (a_d, b_d) = fit[p], fit[d]
    if b_d <= b_p:  # the prefill path is not cheaper per row: it won only by noise at the timed size
        return hi
    return int(min(hi, max(lo, math.ceil((a_p - a_d) / (b_d - b_p)))))


def _kernels_problem(entry: dict) -> str | None:
    """What is wrong with a stored kernels entry (None: usable)."""
    if isinstance(entry.get("schema"), int) and entry["schema"] < SCHEMA:
        return STALE
    if entry.get("schema") != SCHEMA:
        return f"schema {entry.get('schema')!r}, expected {SCHEMA}"
    choices = entry.get("choices")
    if not isinstance(choices, dict):
        return "it has no choices"
    min_rows = entry.get("min_rows")
    if not isinstance(min_rows, dict) or not all(isinstance(v, int) and v > DECODE_MAX_ROWS
                                                 for v in min_rows.values()):
        return f"its min_rows are not row counts above {DECODE_MAX_ROWS}: {str(min_rows)[:60]}"
    for fmt, by_phase in choices.items():
        if fmt not in FORMATS or not isinstance(by_phase, dict):
            return f"unknown format {fmt!r}"
        for phase, path in by_phase.items():
            if phase not in PHASES or path not in FORMATS[fmt]:
                return f"{fmt}.{phase}={path!r} is not a known path"
    return rows_problem(entry)


def kernel_profile(refresh: bool = False, measure_fn=None) -> dict:
    """This machine's measured kernel paths: memoized, else from ``hardware.json``, else measured now (1-2 s)."""
    return cached_section("kernels", measure_fn or measure_kernels, _kernels_problem, refresh)


# ----------------------------------------------------------------------------- the choice
@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> tuple[str, dict]:
    """('auto' | 'fixed', {(format, phase): path}) from ``$DISTILL_LAB_KERNELS``; ValueError names what is wrong."""
    mode, forced = "auto", {}
    for item in value.split(","):
        if item.strip().lower() in ("", "auto", "fixed"):
            mode = item.strip().lower() or mode
            continue
        name, eq, path = item.strip().partition("=")
        fmt, _, phase = name.strip().partition(".")
        phases = PHASES if phase in ("*", "") else (phase,)
        if not eq or fmt not in FORMATS or any(p not in PHASES for p in phases) or path.strip() not in FORMATS[fmt]:
            allowed = "; ".join(f"{f}: {', '.join(ps)}" for f, ps in FORMATS.items())
            raise ValueError(f"{ENV_KERNELS}={value!r}: {item.strip()!r} is not FORMAT.PHASE=PATH; allowed: 'auto', "
                             f"'fixed' or a comma list with PHASE in prefill, decode, * and PATH by format ({allowed})")
        for p in phases:
            forced[(fmt, p)] = path.strip()
    return mode, forced


def check_env() -> None:
    """Raise one-line ``ValueError`` when ``$DISTILL_LAB_KERNELS`` cannot be read."""
    _parse_env(os.environ.get(ENV_KERNELS, "auto"))


def resolved(measure_fn=None) -> tuple[dict[str, dict[str, str]], dict[str, int], set]:
    """({format: {phase: path}}, {format: rows from which the prefill path applies}, forced (format, phase) pairs).

    ``$DISTILL_LAB_KERNELS`` over the measured (or fixed) choice; memoized per env value and measured entry,
    so a quantized Linear's call costs a dictionary lookup.
    """
    env = os.environ.get(ENV_KERNELS, "auto")
    mode, forced = _parse_env(env)
    entry = None if mode == "fixed" else kernel_profile(measure_fn=measure_fn)
    key = (env, id(entry))
    if key in _RESOLVED and _RESOLVED[key][0] is entry:
        return _RESOLVED[key][1]
    measured = FIXED if entry is None else entry["choices"]
    table = {fmt: {ph: measured.get(fmt, {}).get(ph, FIXED[fmt][ph]) for ph in PHASES} for fmt in FORMATS}
    min_rows = {fmt: (FIXED_MIN_ROWS if entry is None else entry.get("min_rows", {})).get(fmt, DECODE_MAX_ROWS + 1)
                for fmt in FORMATS}
    if entry is not None:
        for fmt in FORMATS:
            if fmt not in entry["choices"]:  # nothing measured for it here: the fixed rule
                min_rows[fmt] = FIXED_MIN_ROWS.get(fmt, DECODE_MAX_ROWS + 1)
    for (fmt, phase), path in forced.items():
        table[fmt][phase] = path
        min_rows[fmt] = DECODE_MAX_ROWS + 1  # a forced path applies to its whole phase
    out = (table, min_rows, set(forced))
    _RESOLVED.clear()
    _RESOLVED[key] = (entry, out)
    return out


_RESOLVED: dict = {}  # (env value, id(entry)) -> (entry, resolved()) for the last entry seen


def kernel_paths(measure_fn=None) -> dict[str, dict[str, str]]:
    """{format: {phase: path}} on this CPU: ``$DISTILL_LAB_KERNELS`` over the measured (or fixed) choice."""
    return {fmt: dict(ch) for fmt, ch in resolved(measure_fn)[0].items()}


def kernel_path(fmt: str, rows: int, device: torch.device | str = "cpu") -> str:
    """The path ``fmt`` takes for a call of ``rows`` rows on ``device`` (CUDA and other devices: the fixed rule).

    Decode's path up to ``DECODE_MAX_ROWS`` rows and below the measured crossover (``min_rows``), prefill's above.
    """
    if torch.device(device).type != "cpu":
        small = rows <= DECODE_MAX_ROWS or rows < FIXED_MIN_ROWS.get(fmt, 0)
        return FIXED[fmt]["decode" if small else "prefill"]
    table, min_rows, _ = resolved()
    return table[fmt]["decode" if rows <= DECODE_MAX_ROWS or rows < min_rows[fmt] else "prefill"]


# ----------------------------------------------------------------------------- the report
def format_kernel_profile(entry: dict) -> str:
    """Text table of a ``kernel_profile`` entry: every path's time, its ratio to fp32 and the choice per phase."""
    def verdict(r):
        raw = f" (its time {r['vs_raw']:.2f}x the raw kernel's)" if r.get("vs_raw") else ""
        return ("yes" if r.get("chosen") else "no") + raw

    lines = [*format_rows(entry.get("rows", []), verdict)]
    for name, why in sorted((entry.get("refused") or {}).items()):
        lines.append(f"  refused {name}: {why}")
    lines.append(f"(vs fp32: the speed-up over fp32 for the same call; the raw kernel is the bare integer matmul, "
                 f"without quantizing the input or scaling the output; measured in {entry.get('measured_s', 0):.1f} s)")
    if entry.get("distorted"):
        lines.append("(tiny parallel kernels stalled while measuring, e.g. a sleeping vCPU woken for each one: the "
                     "timings above rank paths by how many ops they launch, so the fixed paths were kept; not stored)")
    elif entry.get("busy"):
        lines.append(f"(measured while the machine was busy: load {entry.get('load', 0):.1f} on {entry.get('cores')} "
                     f"cores; provisional, not stored)")
    table, min_rows, forced = resolved()
    lines.append(f"quantized formats run on this CPU (decode: <= {DECODE_MAX_ROWS} rows per call; prefill: more):")
    for fmt, by_phase in table.items():
        notes = []
        for ph, p in by_phase.items():
            why = "forced by " + ENV_KERNELS if (fmt, ph) in forced else "measured faster"
            note = f"{ph} {p}" + ("" if p == FIXED[fmt][ph] and (fmt, ph) not in forced else f" ({why})")
            if ph == "prefill" and by_phase["prefill"] != by_phase["decode"] and min_rows[fmt] > DECODE_MAX_ROWS + 1:
                note += f" from {min_rows[fmt]} rows (below: {by_phase['decode']})"
            notes.append(note)
        lines.append(f"  {fmt:17s} " + ", ".join(notes))
    for slow in entry.get("slower_than_fp32") or []:
        lines.append(f"  slower than fp32 here: {slow} (no path with the same numbers is faster on this CPU)")
    mode = os.environ.get(ENV_KERNELS)
    if mode:
        lines.append(f"{ENV_KERNELS}={mode} is set: it overrides the measured choice in this shell")
    return "\n".join(lines)
