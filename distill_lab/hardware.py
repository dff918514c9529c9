"""Speed choices measured on this machine, not assumed: bf16 autocast vs fp32, int8/int4 kernels vs fp32.

The same code is fast on one CPU and slow on another. On a 2-core AMD EPYC with AVX512-BF16,
bf16 autocast runs the teacher 2.7x faster than fp32; on a 2-core Intel Xeon that reports the
same ``avx512_bf16`` flag it runs at 0.59x. ISA flags do not settle it, so this module times
fp32 against bf16 and each quantized kernel on the model's shapes (a short micro-benchmark,
well under 2 s), keeps the result per CPU model, torch version and thread count in
``$DISTILL_LAB_CACHE/hardware.json``, and lets ``bf16="auto"`` follow it. This is the
autotuning idea of ATLAS (Whaley & Dongarra, 1998) and FFTW's "wisdom" (Frigo & Johnson, 2005):
measure once on the machine, remember it, reuse it.

Low level on purpose: imports only torch and the standard library.

    resolve_bf16("auto", device)  -> bool   (True/False are returned as given: an explicit choice wins)
    DISTILL_LAB_BF16=0|1|auto               (forces what "auto" means, e.g. for "bf16 forced" runs)
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
from .timing import timed

CACHE_FILE = "hardware.json"
ENV_BF16 = "DISTILL_LAB_BF16"
BF16_MARGIN = 1.15  # bf16 must be at least 15% faster than fp32 before "auto" leaves fp32
BUSY_MARGIN = 1.5  # ... and 50% faster when the machine was busy while measuring (noisy timings)
BUDGET_S = 1.5  # the micro-benchmark stops repeating after this long (it needs a few hundred ms when idle)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")
SCHEMA = 1  # bump when the measurement changes meaning: older cache entries are measured again
_MEMO: dict = {}  # key -> measured entry, for this process


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
def _min_ms(fns: dict, repeats: int, deadline: float) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each callable in milliseconds, calls interleaved.

    Interleaving makes drift hit every candidate alike; the minimum is the run least disturbed by
    other programs (on a shared machine the median measures the neighbours). At least 3 rounds,
    then no new round after ``deadline`` (``time.perf_counter()``).
    """
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first-call allocation and kernel selection
    for i in range(repeats):
        if i >= 3 and time.perf_counter() > deadline:
            break
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: 1e3 * min(t) for name, t in times.items()}


def busy() -> tuple[bool, float]:
    """(busy, 1-minute load average): busy when more tasks wanted to run than there are cores."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return False, float("nan")
    return load > (os.cpu_count() or 1), load


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


def _kernel_candidates(k: int = 576, n: int = 1536, prefill_rows: int = 256, group: int = 64) -> dict:
    """Decode (1 row) and prefill shapes: fp32 vs the int8 / int4 kernels the quantized modules call."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.05  # (N, K)
    x1 = torch.randn(1, k, generator=gen)  # (1, K)
    xp = torch.randn(prefill_rows, k, generator=gen)  # (M, K)
    aten = torch.ops.aten
    out = {"decode": {"fp32": lambda: F.linear(x1, w)}, "prefill": {"fp32": lambda: F.linear(xp, w)}}
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)  # (N, K)
    s8 = torch.rand(n, generator=gen).to(torch.bfloat16)
    x1b = x1.to(torch.bfloat16)
    if hasattr(aten, "_weight_int8pack_mm") and k % 16 == 0:
        out["decode"]["int8 weight-only"] = lambda: aten._weight_int8pack_mm(x1b, w8, s8)
    if hasattr(torch, "_int_mm"):
        xq = torch.randint(-127, 128, (prefill_rows, k), dtype=torch.int8, generator=gen)
        w8t = w8.t()
        out["prefill"]["W8A8 (_int_mm)"] = lambda: torch._int_mm(xq, w8t)
    if hasattr(aten, "_weight_int4pack_mm_for_cpu") and k % group == 0 and n % 16 == 0:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.ones(k // group, n, 2, dtype=torch.bfloat16)
        out["decode"]["int4 g64"] = lambda: aten._weight_int4pack_mm_for_cpu(x1b, packed, group, sz)
    return out


def measure(repeats: int = 9, budget_s: float = BUDGET_S, timer=None, load=None) -> dict:
    """Time fp32 vs bf16 autocast and fp32 vs each quantized kernel here; return the table and the choices.

    Speeds are ``fp32 ms / candidate ms`` (above 1: the candidate is faster). bf16 is chosen only
    when it is at least ``BF16_MARGIN`` times faster (``BUSY_MARGIN`` when the machine was busy),
    so noise cannot move a machine off fp32. ``busy`` entries are not written to the cache file.
    ``timer(fns, repeats, deadline) -> {name: ms}`` and ``load() -> (busy, load)`` replace the
    clock and the load check (tests).
    """
    timer, load_fn = timer or _min_ms, load or busy
    t0 = time.perf_counter()
    was_busy, load = load_fn()
    rows = []
    bf = timer(_bf16_candidates(), repeats, t0 + budget_s / 2)
    rows.append({"what": "MLP block 256x576->1536->576, autocast", "path": "bf16",
                 "fp32_ms": bf["fp32"], "ms": bf["bf16"], "speed": bf["fp32"] / bf["bf16"]})
    for phase, fns in _kernel_candidates().items():
        try:
            ms = timer(fns, repeats if phase == "prefill" else 3 * repeats, t0 + budget_s)
        except (RuntimeError, NotImplementedError):  # a kernel this build lists but cannot run
            ms = {"fp32": timer({"fp32": fns["fp32"]}, repeats, t0 + budget_s)["fp32"]}
        shape = "1x576->1536" if phase == "decode" else "256x576->1536"
        for name, v in ms.items():
            if name != "fp32":
                rows.append({"what": f"{phase} matmul {shape}", "path": name, "fp32_ms": ms["fp32"], "ms": v,
                             "speed": ms["fp32"] / v})
    bf16_speed = rows[0]["speed"]
    now_busy, load_after = load_fn()
    was_busy = was_busy or now_busy
    return {"schema": SCHEMA, "key": machine_key(), "cpu": cpu_model(), "isa": isa_flags(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows,
            "busy": was_busy, "load": max(load, load_after), "cores": os.cpu_count(),
            "choices": {"bf16": bf16_speed >= (BUSY_MARGIN if was_busy else BF16_MARGIN),
                        **{r["path"]: r["speed"] > 1.0 for r in rows[1:]}},
            "measured_s": time.perf_counter() - t0,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


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


def machine_profile(refresh: bool = False, measure_fn=None) -> dict:
    """This machine's measured entry: from memory, else from the cache file, else measured now and stored.

    ``refresh`` measures again. ``measure_fn`` replaces ``measure`` (tests inject a fake one).
    """
    key = machine_key()
    if not refresh and key in _MEMO:
        return _MEMO[key]
    path = cache_path()
    data = _read_cache(path)
    entry = data.get(key)
    if refresh or not isinstance(entry, dict) or entry.get("schema") != SCHEMA or "choices" not in entry:
        entry = (measure_fn or measure)()
        entry["key"] = key
        if entry.get("busy"):
            print(f"distill_lab: this machine was busy while measuring its speeds (load {entry.get('load', 0):.1f} "
                  f"on {entry.get('cores')} cores); using them in this process only, not storing them "
                  f"(bf16='auto' -> {'bf16' if entry['choices']['bf16'] else 'fp32'})", file=sys.stderr)
        else:
            data[key] = entry
            _write_cache(path, data)
    _MEMO[key] = entry
    return entry


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


def resolve_bf16(bf16="auto", device: torch.device | str | None = None, measure_fn=None) -> bool:
    """Whether to run bf16 autocast: an explicit True/False wins; ``'auto'`` follows this machine.

    ``'auto'`` (or None): ``$DISTILL_LAB_BF16`` when it says 0 or 1; else on CUDA, whether the GPU
    supports bf16; else on the CPU, the measured choice (bf16 only when clearly faster than fp32).
    """
    choice = _parse_bf16(bf16, "bf16")
    if choice != "auto":
        return choice
    forced = _parse_bf16(os.environ.get(ENV_BF16, "auto"), ENV_BF16)
    if forced != "auto":
        return forced
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(machine_profile(measure_fn=measure_fn)["choices"]["bf16"])


def check_bf16(value, owner: str, name: str = "bf16") -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is True, False or 'auto'."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"{owner}.{name}={value!r}; allowed: True, False or 'auto' (measured on this machine)")


# ----------------------------------------------------------------------------- the report
def format_profile(entry: dict) -> str:
    """Text table of a ``machine_profile`` entry: the CPU, ISA flags, threads, timings and choices."""
    isa = entry.get("isa") or {}
    have = [f for f, ok in isa.items() if ok] or ["(flags not readable here)"]
    missing = [f for f, ok in isa.items() if not ok]
    lines = [f"CPU:        {entry.get('cpu')}",
             f"ISA flags:  {' '.join(have)}" + (f"   (absent: {' '.join(missing)})" if missing else ""),
             f"torch:      {entry.get('torch')} (kernels compiled for {entry.get('capability')}), "
             f"{entry.get('threads')} threads",
             "",
             f"{'measured here':40s}{'path':>18s}{'fp32 ms':>10s}{'ms':>9s}{'speed vs fp32':>15s}  use it?"]
    choices = entry.get("choices", {})
    for r in entry.get("rows", []):
        use = choices.get(r["path"])
        lines.append(f"{r['what']:40s}{r['path']:>18s}{r['fp32_ms']:10.3f}{r['ms']:9.3f}{r['speed']:14.2f}x  "
                     f"{'yes' if use else 'no'}")
    lines.append("")
    margin = BUSY_MARGIN if entry.get("busy") else BF16_MARGIN  # the one threshold this measurement was judged by
    if entry.get("busy"):
        lines.append(f"(measured while the machine was busy: load {entry.get('load', 0):.1f} on {entry.get('cores')} "
                     f"cores; provisional, not stored; an idle measurement needs only >= {BF16_MARGIN:.2f}x)")
    lines.append(f"bf16='auto' means: {'bf16 autocast' if choices.get('bf16') else 'fp32'} on this CPU "
                 f"(bf16 needs >= {margin:.2f}x to be chosen; explicit bf16=True/False or "
                 f"{ENV_BF16}=0/1 override it)")
    return "\n".join(lines)
