"""Issue 31's search, one table: which student and which last step give the best 10x-smaller combined model.

Every row is a recipe run by ``distill_lab.pipeline.run_recipe`` in the laptop profile (distil steps: 30 x 4
windows of 256 tokens from cached top-64 teacher logits, KD + CE, alpha 0.5), scored on **40** pydoc test
windows of 256 tokens (lesson 00's) and 16 stdlib-code windows, as a perplexity ratio to the teacher on the
same windows. Rows that share a prefix (the same prune and distil steps) reuse it, as sibling recipes do.

Students (both 1.6x fewer block parameters): ``depth`` is lesson 01's (22 of 30 blocks by Block Influence and
1216 of 1536 MLP channels), ``width`` keeps all 30 blocks and 768 channels. Last steps: AWQ alone (the former
combined recipe), AWQ + GPTQ, and quantization-aware distillation (a ``qat`` step: 10 or 30 steps, from the
float weights, AWQ-scaled ones or AWQ + GPTQ's int4 grid). Every int4 row is int4 g64 everywhere: blocks,
embedding and tied head (``embedding_bits: 4``), 10.1x smaller than the fp32 teacher.

    python benchmarks/combined_variants.py [--only NAME ...] [--list] [--work DIR]

About 2-5 min per row on 2 cores (a row that shares its prefix with an earlier one: 1-2 min). Perplexities do
not depend on the machine's load; with ``bf16="auto"`` they can differ between a CPU that runs bf16 autocast and
one that does not (name the CPU with the table). Speed is not this script's business: notebook 04 times the
chosen recipe in the claims table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distill_lab as dl  # noqa: E402
from distill_lab.data import corpus_windows  # noqa: E402
from distill_lab.hardware import cpu_model  # noqa: E402
from distill_lab.pipeline import Recipe, Step, run_recipe, teacher_metrics  # noqa: E402
from distill_lab.pipeline.report import INT4_EVERYWHERE, STUDENT_DISTIL  # noqa: E402
from distill_lab.profiles import get_profile  # noqa: E402

DEPTH = {"layers_keep": 0.7333, "channels_keep": 0.7917, "importance": "activation"}  # lesson 01's student
WIDTH = {"channels_keep": 0.5, "importance": "activation"}  # the combined recipe's student
QAT = {**INT4_EVERYWHERE, "top_k": 64, "alpha": 0.5}


def _rows() -> dict[str, list[Step]]:
    def student(prune, **distil):
        return [Step("prune", dict(prune)), Step("distil", {**STUDENT_DISTIL, **distil})]

    return {
        "depth-float": student(DEPTH),
        "depth-float-lr1e-3": student(DEPTH, lr=1e-3),
        "depth-awq": student(DEPTH) + [Step("quantize", {**INT4_EVERYWHERE, "algorithm": "awq"})],
        "depth-awq-gptq": student(DEPTH) + [Step("quantize", {**INT4_EVERYWHERE, "algorithm": "awq+gptq"})],
        "width-float": student(WIDTH),
        "width-awq-gptq": student(WIDTH) + [Step("quantize", {**INT4_EVERYWHERE, "algorithm": "awq+gptq"})],
        "width-qat10-from-awq-gptq": student(WIDTH) + [Step("qat", {**QAT, "start": "awq+gptq", "steps": 10,
                                                                    "lr": 5e-5})],
        "width-qat10-from-awq": student(WIDTH) + [Step("qat", {**QAT, "start": "awq", "steps": 10, "lr": 1e-4})],
        "width20-qat10-from-awq-gptq": student(WIDTH, steps=20) + [Step("qat", {**QAT, "start": "awq+gptq",
                                                                               "steps": 10, "lr": 1e-4})],
        "width-qat30-only": [Step("prune", dict(WIDTH)), Step("qat", {**QAT, "start": "awq", "steps": 30,
                                                                      "lr": 3e-4})],
        # the claims table's INT4 row on the teacher: AWQ + GPTQ with an int4 or an int8 embedding and tied head
        "teacher-awq-gptq-int4-embedding": [Step("quantize", {**INT4_EVERYWHERE, "algorithm": "awq+gptq"})],
        "teacher-awq-gptq-int8-embedding": [Step("quantize", {**INT4_EVERYWHERE, "embedding_bits": 8,
                                                              "algorithm": "awq+gptq"})],
    }


def main(argv=None) -> int:
    rows = _rows()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(rows), help="run these rows only")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    if args.list:
        for name, steps in rows.items():
            print(f"{name:30s} {' -> '.join(s.label for s in steps)}")
        return 0
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    profile = get_profile("laptop")
    print(f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, laptop profile")
    teacher, tok = dl.load_teacher(device="cpu")
    windows = {"pydoc": corpus_windows("pydoc", "test", tok, profile.seq_len, max_windows=40),
               "stdlib-code": corpus_windows("stdlib-code", "test", tok, profile.seq_len, max_windows=16)}
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    root = args.work or tmp.name
    base = teacher_metrics(teacher, tok, profile, windows, cache=os.path.join(root, "teacher.json"), progress=False,
                           speed=False)
    print(f"teacher: pydoc ppl {base['ppl_pydoc']:.2f} on 40 windows\n")
    print("| row | steps | size reduction | ppl ratio pydoc | ppl ratio stdlib-code | seconds (steps) |")
    print("|---|---|---|---|---|---|")
    for name in args.only or list(rows):
        start = time.perf_counter()
        r = run_recipe(teacher, tok, Recipe(name, rows[name]), os.path.join(root, name), profile=profile,
                       windows=windows, teacher_stats=base, progress=False, keep_model=False, cache_dir=root,
                       measure_steps="last", timing="none")
        m = r.final.metrics
        print(f"| {name} | {' → '.join(s.label for s in rows[name])} | {m['size_reduction']:.2f}× | "
              f"{m['ppl_ratio_pydoc']:.3f} | {m['ppl_ratio_stdlib-code']:.3f} | "
              f"{time.perf_counter() - start:.0f} ({', '.join(f'{s.seconds:.0f}' for s in r.steps)}) |", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
