"""Speed choices measured on this machine, not assumed: bf16 autocast vs fp32, per phase, and the cache they live in.

The same code is fast on one CPU and slow on another. On a 2-core AMD EPYC with AVX512-BF16,
bf16 autocast runs the teacher 2.7x faster than fp32; on a 2-core Intel Xeon that reports the
same ``avx512_bf16`` flag it runs at 0.59x. ISA flags do not settle it, so this module times
fp32 against bf16 at prefill (256 rows) and at decode (1 row) on the model's shapes (a short
micro-benchmark, well under a second), keeps the result per CPU model, torch version and thread
count in ``$DISTILL_LAB_CACHE/hardware.json``, and lets ``bf16="auto"`` follow it. This is the
autotuning idea of ATLAS (Whaley & Dongarra, 1998) and FFTW's "wisdom" (Frigo & Johnson, 2005):
measure once on the machine, remember it, reuse it.

The same file holds other measured sections: ``quantization.dispatch`` stores which int8 / int4
kernel path each quantized format takes (``cached_section``). Every section is validated when it
is read; a damaged one is reported in one line, dropped from the file and measured again.

Low level on purpose: imports only torch and the standard library.

    resolve_bf16("auto", device, phase="prefill")  -> bool   (True/False are returned as given)
    DISTILL_LAB_BF16=0|1|auto                      (forces what "auto" means, e.g. for "bf16 forced" runs)
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ._fs import atomic_write_text
from .timing import MIN_ROUNDS, SpeedRatio, timed

__all__ = ["BF16_MARGIN", "BF16_ROWS", "BUDGET_S", "busy", "BUSY_MARGIN", "CACHE_FILE", "cache_path",
           "cached_section", "check_bf16", "check_env", "clear_memo", "contended", "CONTENTION_MIN_MS",
           "CONTENTION_RATIO", "cpu_model", "ENV_BF16", "format_machine", "format_profile", "format_rows",
           "ISA_FLAGS", "isa_flags", "machine_key", "machine_profile", "measure", "min_ms", "PHASES",
           "resolve_bf16", "round_spread", "RoundTimes", "rows_problem", "SCHEMA", "STALE"]

CACHE_FILE = "hardware.json"
ENV_BF16 = "DISTILL_LAB_BF16"
BF16_MARGIN = 1.15  # bf16 must be at least 15% faster than fp32 before "auto" leaves fp32
BUSY_MARGIN = 1.5  # ... and 50% faster when the machine was busy while measuring (noisy timings)
BUDGET_S = 1.0  # the bf16 micro-benchmark stops repeating after this long (a few hundred ms when idle)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")
SCHEMA = 3  # bump when the measurement changes meaning: older cache entries are measured again (3: spread)
_MEMO: dict = {}  # (machine key, section) -> measured entry, for this process
PHASES = ("prefill", "decode")  # many rows per call (a prompt, training, perplexity) vs one token per sequence


# ----------------------------------------------------------------------------- the machine
@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=None)
def isa_flags() -> dict[str, bool]:
    """The vector / matrix instruction flags that decide bf16 and int8 speed (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return {flag: flag in have for flag in ISA_FLAGS}
    except OSError:
        pass
    return {}


def machine_key() -> str:
    """Cache key: CPU model, torch version and thread count (a choice measured elsewhere is not reused)."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_path() -> Path:
    """``$DISTILL_LAB_CACHE/hardware.json`` (default ``~/.cache/distill_lab``)."""
    root = os.environ.get("DISTILL_LAB_CACHE") or Path.home() / ".cache" / "distill_lab"
    return Path(root) / CACHE_FILE


# ----------------------------------------------------------------------------- the micro-benchmark
class RoundTimes(dict):
    """``{name: fastest ms}`` (what a choice is judged by), with every round kept in ``rounds``: ``{name: [ms]}``."""

    rounds: dict[str, list[float]]


def min_ms(fns: dict, repeats: int, deadline: float, cap_ms: float = 1000.0) -> RoundTimes:
    """Fastest of ``repeats`` calls of each callable in milliseconds, calls interleaved (every round in ``.rounds``).

    Interleaving makes drift hit every candidate alike; the minimum is the run least disturbed by
    other programs (on a shared machine the median measures the neighbours). At least ``MIN_ROUNDS``
    rounds, then no new round after ``deadline`` (``time.perf_counter()``). A candidate whose warm-up call
    takes longer than ``cap_ms`` is not called again (its time is that call's): one pathological
    kernel costs one call, not seconds per repeat.
    """
    times = {name: [] for name in fns}
    slow = set()
    for name, fn in fns.items():
        t = timed(fn)  # warm-up: first-call allocation and kernel selection
        if 1e3 * t > cap_ms:
            times[name].append(t)
            slow.add(name)
    for i in range(max(repeats, MIN_ROUNDS)):
        if i >= MIN_ROUNDS and time.perf_counter() > deadline:
            break
        for name, fn in fns.items():
            if name not in slow:
                times[name].append(timed(fn))
    out = RoundTimes({name: 1e3 * min(t) for name, t in times.items()})
    out.rounds = {name: [1e3 * x for x in t] for name, t in times.items()}
    return out


def round_spread(ms: dict, name: str, base: str = "fp32") -> list[float] | None:
    """``[low, high]``: the interquartile range of the per-round speed-ups ``base / name`` (None: no rounds kept)."""
    rounds = getattr(ms, "rounds", None)
    if not rounds or len(rounds.get(name, ())) < 2 or len(rounds.get(base, ())) < 2:
        return None
    n = min(len(rounds[name]), len(rounds[base]))
    r = SpeedRatio.of_rounds(rounds[base][:n], rounds[name][:n])
    return [r.low, r.high]


CONTENTION_RATIO = 20.0  # a tiny parallel kernel this much slower on all threads than on one ...
CONTENTION_MIN_MS = 1.0  # ... and slower than this (fork/join overhead alone stays far below): timings unreliable
STALE = "stale"  # what a section's problem check returns for an entry of an older layout: measured again quietly


def contended(repeats: int = 5) -> bool:
    """True when a tiny parallel kernel runs far slower on all of torch's threads than on one.

    Seen on 2-core cloud VMs: in some process states every parallel region of a ~30 us kernel
    (``torch._int_mm`` at one row) waits milliseconds for its second thread (a sleeping vCPU woken
    by the hypervisor), 7.9 ms against 0.034 ms on one thread, consistently; MKL's fp32 GEMV is not
    affected. A measurement taken then would rank paths by how many parallel ops they launch, not
    by their speed, so callers treat it as busy.
    """
    threads = torch.get_num_threads()
    if threads < 2 or not hasattr(torch, "_int_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 576), dtype=torch.int8, generator=gen)  # (1, K)
    b = torch.randint(-127, 128, (576, 1536), dtype=torch.int8, generator=gen)  # (K, N)

    def op():
        torch._int_mm(a, b)

    op()
    many = min(timed(op) for _ in range(repeats))
    torch.set_num_threads(1)
    try:
        one = min(timed(op) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return many > CONTENTION_RATIO * one and 1e3 * many > CONTENTION_MIN_MS


def busy() -> tuple[bool, float]:
    """(busy, 1-minute load average): busy when more tasks wanted to run than there are cores, or when
    tiny parallel kernels are pathologically slow right now (``contended``)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        load = float("nan")
    return load > (os.cpu_count() or 1) or contended(), load


def _bf16_candidates(rows: int = 256, hidden: int = 576, inter: int = 1536) -> dict:
    """fp32 vs bf16-autocast forward of one MLP block at the teacher's width (rows tokens)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen)  # (T, H)
    w1 = torch.randn(inter, hidden, generator=gen) * 0.05  # (I, H)
    w2 = torch.randn(hidden, inter, generator=gen) * 0.05  # (H, I)

    def mlp():
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # fp32 even inside a caller's autocast
            return F.linear(F.silu(F.linear(x, w1)), w2)  # (T, H)

    def mlp_bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return F.linear(F.silu(F.linear(x, w1)), w2)  # (T, H)

    return {"fp32": mlp, "bf16": mlp_bf16}


BF16_ROWS = {"prefill": 256, "decode": 1}  # rows of the MLP block timed for each phase


def measure(repeats: int = 9, budget_s: float = BUDGET_S, timer=None, load=None) -> dict:
    """Time fp32 vs bf16 autocast here, at prefill (256 rows) and at decode (1 row); return the table and the choices.

    Speeds are ``fp32 ms / bf16 ms`` (above 1: bf16 is faster). bf16 is chosen for a phase only
    when it is at least ``BF16_MARGIN`` times faster (``BUSY_MARGIN`` when the machine was busy),
    so noise cannot move a machine off fp32. ``busy`` entries are not written to the cache file.
    ``timer(fns, repeats, deadline) -> {name: ms}`` and ``load() -> (busy, load)`` replace the
    clock and the load check (tests).
    """
    timer, load_fn = timer or min_ms, load or busy
    t0 = time.perf_counter()
    was_busy, load = load_fn()
    rows = []
    for i, (phase, n) in enumerate(BF16_ROWS.items()):
        ms = timer(_bf16_candidates(n), repeats if phase == "prefill" else 3 * repeats,
                   t0 + budget_s * (i + 1) / len(BF16_ROWS))
        rows.append({"what": f"MLP block {n}x576->1536->576, autocast", "phase": phase, "path": "bf16",
                     "fp32_ms": ms["fp32"], "ms": ms["bf16"], "speed": ms["fp32"] / ms["bf16"],
                     "spread": round_spread(ms, "bf16")})
    now_busy, load_after = load_fn()
    was_busy = was_busy or now_busy
    margin = BUSY_MARGIN if was_busy else BF16_MARGIN
    speed = {r["phase"]: r["speed"] for r in rows}
    return {"schema": SCHEMA, "key": machine_key(), "cpu": cpu_model(), "isa": isa_flags(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows,
            "busy": was_busy, "load": max(load, load_after), "cores": os.cpu_count(),
            "choices": {"bf16": speed["prefill"] >= margin, "bf16_decode": speed["decode"] >= margin},
            "measured_s": time.perf_counter() - t0,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _bf16_problem(entry: dict) -> str | None:
    """What is wrong with a stored bf16 entry (None: usable)."""
    choices = entry.get("choices")
    if not isinstance(choices, dict) or not all(isinstance(choices.get(c), bool) for c in ("bf16", "bf16_decode")):
        return "its choices are not bf16 / bf16_decode true-or-false"
    return rows_problem(entry)


def rows_problem(entry: dict) -> str | None:
    """What is wrong with an entry's timing rows and fields (None: usable); shared by every measured section."""
    rows = entry.get("rows")
    if not isinstance(rows, list) or not rows:
        return "it has no timing rows"
    for r in rows:
        if not isinstance(r, dict) or not all(isinstance(r.get(f), (int, float)) and r.get(f) == r.get(f)
                                              for f in ("fp32_ms", "ms", "speed")):
            return f"a timing row is damaged: {str(r)[:80]}"
        if not isinstance(r.get("what"), str) or not isinstance(r.get("path"), str):
            return f"a timing row has no 'what' / 'path': {str(r)[:80]}"
    if not isinstance(entry.get("key"), str):
        return "it has no machine key"
    return None


# ----------------------------------------------------------------------------- the cache
def _read_cache(path: Path) -> dict:
    """The cache file's entries; a missing file is empty, a corrupt one is reported in one line and ignored."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        print(f"distill_lab: {path} is unreadable ({err}); measuring this machine again", file=sys.stderr)
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Write the JSON atomically (temp file beside it, then one rename); a read-only cache only loses the memo."""
    try:
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as err:
        print(f"distill_lab: could not write {path} ({err}); the measurement is kept for this process only",
              file=sys.stderr)


def _entry_problem(entry, problem_fn) -> str | None:
    """``problem_fn(entry)``, with a non-dict or a crashing check counted as damage."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    try:
        return problem_fn(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"{type(err).__name__}: {err}"


def cached_section(section: str, measure_fn, problem_fn, refresh: bool = False) -> dict:
    """This machine's measured ``section``: from memory, else from the cache file, else measured now and stored.

    The file maps a machine key to ``{"schema": SCHEMA, section: entry, ...}``. ``problem_fn(entry)``
    says what is wrong with a stored entry (None when usable): a damaged one is reported in one line,
    measured again and replaced (or, when the machine is busy, dropped from the file). ``refresh``
    measures again. Entries measured while the machine was busy are used in this process only.
    """
    key = machine_key()
    if not refresh and (key, section) in _MEMO:
        return _MEMO[(key, section)]
    path = cache_path()
    data = _read_cache(path)
    stored = data.get(key)
    sections = {k: v for k, v in stored.items()} if isinstance(stored, dict) and stored.get("schema") == SCHEMA else {}
    entry = sections.get(section)
    problem = None if entry is None else _entry_problem(entry, problem_fn)
    if problem == STALE:  # an older layout of this section (an upgrade), not damage: measured again quietly
        entry, problem = None, None
    if problem:
        print(f"distill_lab: {path} holds a damaged {section!r} entry for this machine ({problem}); "
              f"measuring again", file=sys.stderr)
    if refresh or entry is None or problem:
        entry = measure_fn()
        entry["key"] = key
        if entry.get("busy"):
            print(f"distill_lab: this machine was busy while measuring its {section} speeds (load "
                  f"{entry.get('load', 0):.1f} on {entry.get('cores')} cores); using them in this process only, "
                  f"not storing them ({entry.get('summary', 'python -m distill_lab doctor shows them')})",
                  file=sys.stderr)
            sections.pop(section, None)
            if problem:  # a damaged entry must not be read again by the next process
                data[key] = {**sections, "schema": SCHEMA}
                _write_cache(path, data)
        else:
            sections[section] = entry
            data[key] = {**sections, "schema": SCHEMA}
            _write_cache(path, data)
    _MEMO[(key, section)] = entry
    return entry


def machine_profile(refresh: bool = False, measure_fn=None) -> dict:
    """This machine's measured bf16 entry (``cached_section``). ``measure_fn`` replaces ``measure`` (tests)."""
    return cached_section("bf16", measure_fn or measure, _bf16_problem, refresh)


def clear_memo() -> None:
    """Forget what this process measured or read (the cache file stays)."""
    _MEMO.clear()


# ----------------------------------------------------------------------------- the choices
def _parse_bf16(value, name: str):
    """True / False / 'auto' from a bool or a string ('1', 'true', '0', 'false', 'auto'); ValueError otherwise."""
    if value is None or isinstance(value, bool):
        return "auto" if value is None else value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        if v in ("auto", ""):
            return "auto"
    raise ValueError(f"{name}={value!r}; allowed: True, False or 'auto' (measured on this machine)")


def check_env() -> None:
    """Raise one-line ``ValueError`` when ``$DISTILL_LAB_BF16`` holds something other than 0, 1 or auto."""
    value = os.environ.get(ENV_BF16)
    if value is not None:
        try:
            _parse_bf16(value, ENV_BF16)
        except ValueError:
            raise ValueError(f"{ENV_BF16}={value!r}; allowed: 0, 1 or auto (or unset: measured on this "
                             f"machine)") from None


def resolve_bf16(bf16="auto", device: torch.device | str | None = None, measure_fn=None,
                 phase: str = "prefill") -> bool:
    """Whether to run bf16 autocast: an explicit True/False wins; ``'auto'`` follows this machine.

    ``'auto'`` (or None): ``$DISTILL_LAB_BF16`` when it says 0 or 1; else on CUDA, whether the GPU
    supports bf16; else on the CPU, the measured choice for ``phase`` ('prefill': many rows per
    call; 'decode': one token per sequence), bf16 only when clearly faster than fp32 there.
    """
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}; allowed: {', '.join(PHASES)}")
    choice = _parse_bf16(bf16, "bf16")
    if choice != "auto":
        return choice
    check_env()
    forced = _parse_bf16(os.environ.get(ENV_BF16, "auto"), ENV_BF16)
    if forced != "auto":
        return forced
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    choices = machine_profile(measure_fn=measure_fn)["choices"]
    return bool(choices["bf16" if phase == "prefill" else "bf16_decode"])


def check_bf16(value, owner: str, name: str = "bf16") -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is True, False or 'auto'."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"{owner}.{name}={value!r}; allowed: True, False or 'auto' (measured on this machine)")


# ----------------------------------------------------------------------------- the report
def format_machine(entry: dict) -> str:
    """The CPU, its ISA flags, torch and the thread count of a measured entry (the header of ``doctor``)."""
    isa = entry.get("isa") or {}
    have = [f for f, ok in isa.items() if ok] or ["(flags not readable here)"]
    missing = [f for f, ok in isa.items() if not ok]
    return "\n".join([f"CPU:        {entry.get('cpu')}",
                      f"ISA flags:  {' '.join(have)}" + (f"   (absent: {' '.join(missing)})" if missing else ""),
                      f"torch:      {entry.get('torch')} (kernels compiled for {entry.get('capability')}), "
                      f"{entry.get('threads')} threads"])


def format_rows(rows: list[dict], choices_of) -> list[str]:
    """Lines of a timing table: what, phase, path, fp32 ms, ms, speed vs fp32 and ``choices_of(row)`` (the verdict)."""
    lines = [f"{'measured here':44s}{'phase':>8s}{'path':>16s}{'fp32 ms':>10s}{'ms':>10s}{'vs fp32':>9s}"
             f"{'per round':>13s}  chosen?"]
    for r in rows:
        spread = r.get("spread")
        rng = f"{spread[0]:.2f}–{spread[1]:.2f}" if spread else "-"
        lines.append(f"{r['what']:44s}{r.get('phase', ''):>8s}{r['path']:>16s}{r['fp32_ms']:10.3f}{r['ms']:10.3f}"
                     f"{r['speed']:8.2f}x{rng:>13s}  {choices_of(r)}")
    lines.append("(fp32 ms, ms and vs fp32: the fastest of the alternating rounds, which the choice is judged by; "
                 "per round: the interquartile range of the per-round speed-ups)")
    return lines


def format_profile(entry: dict) -> str:
    """Text table of a ``machine_profile`` entry: the CPU, ISA flags, threads, bf16 timings and choices."""
    choices = entry.get("choices", {})

    def verdict(r):
        return "yes" if choices.get("bf16" if r.get("phase", "prefill") == "prefill" else "bf16_decode") else "no"

    lines = [format_machine(entry), "", *format_rows(entry.get("rows", []), verdict), ""]
    margin = BUSY_MARGIN if entry.get("busy") else BF16_MARGIN  # the one threshold this measurement was judged by
    if entry.get("busy"):
        lines.append(f"(measured while the machine was busy: load {entry.get('load', 0):.1f} on {entry.get('cores')} "
                     f"cores; provisional, not stored; an idle measurement needs only >= {BF16_MARGIN:.2f}x)")
    name = {True: "bf16 autocast", False: "fp32"}
    lines.append(f"bf16='auto' means: {name[bool(choices.get('bf16'))]} at prefill, "
                 f"{name[bool(choices.get('bf16_decode'))]} at decode on this CPU "
                 f"(bf16 needs >= {margin:.2f}x to be chosen; explicit bf16=True/False or "
                 f"{ENV_BF16}=0/1 override it)")
    return "\n".join(lines)
