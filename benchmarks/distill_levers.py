"""Issue 16's levers, one table: which student and which training make a distilled student that speaks.

Every row trains a copy of a structured-pruned teacher for the same budget as notebook 01's laptop
profile (32 steps x 4 x 128 tokens, AdamW 3e-4 after 4 warm-up steps, bf16 autocast where it is
faster here) and prints what 01 checks: test perplexity ratio to the teacher on pydoc and on
stdlib-code, and the repeated-4-gram share of 40 greedy tokens after each of 01's two prompts.

Levers: which blocks/channels are kept (depth by Block Influence, width by activation), the loss
(CE only, forward KL with alpha 0.5 or 1 on the top-64 cache), on-policy steps (GKD, live teacher),
the training text (pydoc only, or half pydoc and half stdlib-code windows), the learning rate and
its schedule, and a hidden-state loss (DistilBERT's cosine) on the last or three kept blocks.

    python benchmarks/distill_levers.py [--only NAME ...] [--list]

About 1 min per row on 2 cores (on-policy and live-teacher rows ~1.5-2 min); all rows ~30 min.
Perplexities and repetition shares do not depend on the machine's load; with ``bf16="auto"`` they can differ
between a CPU that runs bf16 autocast and one that does not (name the CPU with the table).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distill_lab as dl  # noqa: E402
from distill_lab.distillation import (DistillationLoss, DistillationTrainer, HiddenStateLoss,  # noqa: E402
                                      TrainConfig, cache_teacher_logits)
from distill_lab.pruning import StructuredConfig, prune_structured  # noqa: E402
from distill_lab.pruning.selection import as_batches  # noqa: E402
from distill_lab.pruning.structured import block_influence, select_layers  # noqa: E402

SIZES = dict(seq=128, batch=4, steps=32, warmup=4, test_windows=48, k=64, lr=3e-4, prompt=32, gen=32, new_tokens=40)
PROMPTS = ["The try statement specifies", "A list comprehension consists of"]  # notebook 01's
# ten more, written once before any of them was run, so that a lever is not judged on two prompts' luck
MORE_PROMPTS = ["The with statement is used to", "A generator function is", "The import statement",
                "A dictionary maps", "The for statement is used to", "An exception is raised when",
                "A class definition defines", "A lambda expression", "The global statement", "A tuple is"]
STUDENTS = {  # name: (share of blocks kept by Block Influence, share of MLP channels kept by activation)
    "22 blocks + 80 % channels (01's)": (22 / 30, 0.8),
    "30 blocks + 50 % channels (width)": (1.0, 0.5),
    "26 blocks + 62 % channels": (26 / 30, 0.62),
    "20 blocks (depth)": (20 / 30, 1.0),
    "15 blocks (half depth)": (15 / 30, 1.0),
}
C22, W50, M26, D20, S15 = STUDENTS
# row name: (student, [(phase, steps, options)]); phases: cache/mixed (cached top-k, pydoc or both corpora),
# onp (on-policy KD with the live teacher), live (full-vocabulary KD with the live teacher, no top-k
# cut; needed for the hidden-state loss), none (the pruned model untrained); options: alpha, lr,
# min_lr_ratio (a cosine decay to that share of lr after the warm-up; 1.0 = constant, 01's), hidden
# ("last": the last hidden states; "spread": three depths, each student block paired with the
# teacher block it was kept as)
ROWS = {
    "01's student, untrained": (C22, [("none", 0, {})]),
    "01's student, CE only": (C22, [("cache", 32, {"alpha": 0.0})]),
    "01's student, forward KL a=0.5 (01)": (C22, [("cache", 32, {"alpha": 0.5})]),
    "01's student, KD only a=1": (C22, [("cache", 32, {"alpha": 1.0})]),
    "01's student, on-policy KD (lambda 1)": (C22, [("onp", 32, {})]),
    "01's student, 16 KL + 16 on-policy": (C22, [("cache", 16, {"alpha": 0.5}), ("onp", 16, {"seed": 1})]),
    "01's student, 24 KL + 8 on-policy": (C22, [("cache", 24, {"alpha": 0.5}), ("onp", 8, {"seed": 1})]),
    "01's student, both corpora, CE only": (C22, [("mixed", 32, {"alpha": 0.0})]),
    "01's student, both corpora, KL a=0.5": (C22, [("mixed", 32, {"alpha": 0.5})]),
    "01's student, both corpora, KL a=0.8": (C22, [("mixed", 32, {"alpha": 0.8})]),
    "01's student, both corpora, KD a=1": (C22, [("mixed", 32, {"alpha": 1.0})]),
    "width, CE only": (W50, [("cache", 32, {"alpha": 0.0})]),
    "width, forward KL a=0.5": (W50, [("cache", 32, {"alpha": 0.5})]),
    "width, both corpora, KL a=0.5": (W50, [("mixed", 32, {"alpha": 0.5})]),
    "26 blocks + 62 %, forward KL a=0.5": (M26, [("cache", 32, {"alpha": 0.5})]),
    "depth 20, forward KL a=0.5": (D20, [("cache", 32, {"alpha": 0.5})]),
    "half depth, CE only": (S15, [("cache", 32, {"alpha": 0.0})]),
    "half depth, forward KL a=0.5": (S15, [("cache", 32, {"alpha": 0.5})]),
    "01's student, KL a=0.5, lr 1e-4": (C22, [("cache", 32, {"alpha": 0.5, "lr": 1e-4})]),
    "01's student, KL a=0.5, lr 1e-3": (C22, [("cache", 32, {"alpha": 0.5, "lr": 1e-3})]),
    "01's student, KL a=0.5, cosine to 10 %": (C22, [("cache", 32, {"alpha": 0.5, "min_lr_ratio": 0.1})]),
    "01's student, CE only, cosine to 10 %": (C22, [("cache", 32, {"alpha": 0.0, "min_lr_ratio": 0.1})]),
    "01's student, KD a=1, cosine to 10 %": (C22, [("cache", 32, {"alpha": 1.0, "min_lr_ratio": 0.1})]),
    "01's student, KL a=0.5, cosine to 0": (C22, [("cache", 32, {"alpha": 0.5, "min_lr_ratio": 0.0})]),
    "01's student, both corpora, KL, cosine": (C22, [("mixed", 32, {"alpha": 0.5, "min_lr_ratio": 0.1})]),
    "width, CE only, cosine to 10 %": (W50, [("cache", 32, {"alpha": 0.0, "min_lr_ratio": 0.1})]),
    "width, KL a=0.5, cosine to 10 %": (W50, [("cache", 32, {"alpha": 0.5, "min_lr_ratio": 0.1})]),
    "01's student, KL a=0.5, live teacher": (C22, [("live", 32, {"alpha": 0.5})]),
    "01's student, KL a=0.5 + last hidden": (C22, [("live", 32, {"alpha": 0.5, "hidden": "last"})]),
    "01's student, KL a=0.5 + 3 hidden": (C22, [("live", 32, {"alpha": 0.5, "hidden": "spread"})]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows (names as in --list)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(ROWS))
        return 0
    unknown = [r for r in args.only or [] if r not in ROWS]
    if unknown:
        print(f"unknown row(s) {unknown}; allowed: {list(ROWS)}", file=sys.stderr)
        return 2
    rows = args.only or list(ROWS)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    env = dl.environment_info()
    print(f"{env.get('cpu', env['device'])}; torch {env['torch']}, {torch.get_num_threads()} threads")
    dl.set_seed(0)
    S = SIZES
    teacher, tok = dl.load_teacher(device="cpu")
    pydoc = dl.corpus_windows("pydoc", "train", tok, S["seq"])
    code = dl.corpus_windows("stdlib-code", "train", tok, S["seq"])
    test = dl.corpus_windows("pydoc", "test", tok, S["seq"])[:S["test_windows"]]
    test_code = dl.corpus_windows("stdlib-code", "test", tok, S["seq"])[:S["test_windows"]]
    n = S["steps"] * S["batch"]
    train = pydoc[torch.randperm(len(pydoc), generator=torch.Generator().manual_seed(0))[:n]]  # as notebook 01
    code_pick = torch.randperm(len(code), generator=torch.Generator().manual_seed(0))[:n // 2]
    mixed = torch.cat([train[:n // 2], code[code_pick]])
    mixed = mixed[torch.randperm(n, generator=torch.Generator().manual_seed(1))]  # (n, seq): half of each corpus
    caches = {"cache": cache_teacher_logits(teacher, train, k=S["k"], batch_size=8, bf16="auto"),
              "mixed": cache_teacher_logits(teacher, mixed, k=S["k"], batch_size=8, bf16="auto")}
    t_ppl = (dl.perplexity(teacher, test, bf16="auto", progress=False),
             dl.perplexity(teacher, test_code, bf16="auto", progress=False))
    calibration = dl.calibration_batches(pydoc, 16, 8)  # as notebook 01
    students, t_params = {}, dl.parameter_count(teacher, "non_embedding")

    def config(steps, lr=S["lr"], min_lr_ratio=1.0, **extra):
        return TrainConfig(steps=steps, batch_size=S["batch"], lr=lr, warmup_steps=min(S["warmup"], steps - 1),
                           min_lr_ratio=min_lr_ratio, bf16="auto", progress=False, **extra)

    def hidden_loss(student, layers_keep, how):
        """HiddenStateLoss pairing student blocks with the teacher blocks they were kept as (cosine, weight 1)."""
        if how == "last":
            pairs = HiddenStateLoss.last_layers(student, teacher)
        else:  # the blocks prune_structured kept, from the same Block Influence on the same calibration
            kept = select_layers(block_influence(teacher, as_batches(calibration)), layers_keep)
            n_s = len(kept)
            pairs = [(i, kept[i - 1] + 1) for i in (n_s // 3, 2 * n_s // 3, n_s)]  # after student block i
        return HiddenStateLoss(student.config.hidden_size, teacher.config.hidden_size, pairs)

    print(f"teacher: pydoc test {t_ppl[0]:.2f}, stdlib-code test {t_ppl[1]:.2f}\n")
    print(f"{'row':40}{'fewer':>6}{'pydoc':>7}{'code':>7}{'rep4 p1':>8}{'rep4 p2':>8}{'12 mean':>9}{'≤20%':>6}"
          f"{'s':>5}")
    for name in rows:
        student_name, plan = ROWS[name]
        if student_name not in students:
            layers, channels = STUDENTS[student_name]
            students[student_name] = prune_structured(
                teacher, StructuredConfig(layers_keep=layers, channels_keep=channels, importance="activation"),
                calibration=calibration)
        s = copy.deepcopy(students[student_name])
        start = time.perf_counter()
        for phase, steps, opt in plan:
            sched = {k: opt[k] for k in ("lr", "min_lr_ratio") if k in opt}
            loss = DistillationLoss(kd_temperature=1.0, alpha=opt.get("alpha", 1.0))
            if phase in caches:
                DistillationTrainer(s, caches[phase], loss=loss, config=config(steps, **sched)).train()
            elif phase == "live":
                hidden = hidden_loss(s, STUDENTS[student_name][0], opt["hidden"]) if "hidden" in opt else None
                DistillationTrainer(s, train, teacher=teacher, loss=loss, hidden=hidden,
                                    config=config(steps, **sched)).train()
            elif phase == "onp":
                cfg = config(steps, seed=opt.get("seed", 0), lmbda=1.0, prompt_tokens=S["prompt"],
                             gen_tokens=S["gen"])
                DistillationTrainer(s, train, teacher=teacher, loss=loss, config=cfg).train()  # KD only
        seconds = time.perf_counter() - start
        s.eval()
        ratio = (dl.perplexity(s, test, bf16="auto", progress=False) / t_ppl[0],
                 dl.perplexity(s, test_code, bf16="auto", progress=False) / t_ppl[1])
        rep = [dl.repeated_ngram_share(out["ids"], 4) for p in PROMPTS + MORE_PROMPTS
               for out in dl.generate_continuations(s, tok, [p], max_new_tokens=S["new_tokens"])]
        rep12 = sum(rep) / len(rep), sum(r <= 0.2 for r in rep)
        fewer = t_params / dl.parameter_count(s, "non_embedding")
        print(f"{name:40}{fewer:6.2f}{ratio[0]:7.2f}{ratio[1]:7.2f}{rep[0]:8.0%}{rep[1]:8.0%}{rep12[0]:9.0%}"
              f"{rep12[1]:6d}{seconds:5.0f}", flush=True)
    print("\n(fewer: non-embedding parameters, teacher / student; pydoc, code: test perplexity / the teacher's;"
          f" rep4: share of repeated 4-grams in {S['new_tokens']} greedy tokens after each of notebook 01's prompts;"
          f" 12 mean: its mean over those two and {len(MORE_PROMPTS)} more prompts; ≤20%: how many of the 12 are"
          " at most 20 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
