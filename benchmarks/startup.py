"""Wall time of a fresh process that imports distill_lab and loads the cached teacher.

Three commands run in turn (interleaved, so drift hits all of them alike), each in a new interpreter:
  bare    ``import torch; from transformers import LlamaForCausalLM, AutoTokenizer`` (the floor
          any course built on these libraries pays)
  nofreeze  ``import distill_lab as dl; dl.load_teacher()`` with ``DISTILL_LAB_GC_FREEZE=0``
  default ``import distill_lab as dl; dl.load_teacher()`` as shipped (import-time objects frozen,
          see distill_lab/_startup.py)
The first teacher load converts the GGUF once; a warm-up process does that before timing.

Usage: python benchmarks/startup.py [--repeats 5] [--check]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

LOAD = "import distill_lab as dl; m, tok = dl.load_teacher()"
COMMANDS = {
    "bare": ("import torch; from transformers import LlamaForCausalLM, AutoTokenizer", {}),
    "nofreeze": (LOAD, {"DISTILL_LAB_GC_FREEZE": "0"}),
    "default": (LOAD, {}),
}
LIMIT_S = 3.0  # issue 2: "after the first call it takes under 3 s on 2 cores"


def wall_time(code: str, extra_env: dict) -> float:
    """Seconds a fresh ``python -c code`` takes from start to exit; raises if it fails."""
    env = {**os.environ, **extra_env}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"`python -c {code!r}` failed:\n{done.stderr[-2000:]}")
    return elapsed


def main():
    """Time each command in fresh processes and print medians and ratios against the bare imports."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 unless the default median is under {LIMIT_S:g} s")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be >= 1")

    wall_time(LOAD, {})  # converts the GGUF on a fresh cache, warms the OS file cache
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, (code, extra_env) in COMMANDS.items():
            times[name].append(wall_time(code, extra_env))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"cpu threads: {os.cpu_count()} | load average: {os.getloadavg()[0]:.2f} | "
          f"median of {args.repeats} fresh processes")
    print(f"{'':9}{'median s':>10}{'min s':>8}{'max s':>8}{'vs bare':>9}")
    for name, ts in times.items():
        print(f"{name:9}{medians[name]:>10.2f}{min(ts):>8.2f}{max(ts):>8.2f}"
              f"{medians[name] / medians['bare']:>8.2f}x")
    print(f"default is {medians['nofreeze'] / medians['default']:.2f}x faster than nofreeze")
    if args.check and medians["default"] >= LIMIT_S:
        raise SystemExit(f"default median {medians['default']:.2f} s is not under {LIMIT_S:g} s")


if __name__ == "__main__":
    main()
