"""Issue 16's levers, one table: which student and which training make a distilled student that speaks.

Every row trains a copy of a structured-pruned teacher for the same budget as notebook 01's laptop
profile (its sizes, from ``profiles.LESSONS["01"]``: 32 steps x 4 x 128 tokens, AdamW 3e-4 after 4 warm-up
steps, bf16 autocast where it is faster here).

Choosing and reporting are kept apart, as for the data: a row is **chosen** on validation data only, its
perplexity ratio to the teacher on pydoc validation windows and the repeated-4-gram share of 40 greedy
tokens after each of ``VALIDATION_PROMPTS`` (``distill_lab/data.py``); it is **reported** on what no choice
saw: test perplexity on pydoc and on stdlib-code, and the same share after each of ``HELD_OUT_PROMPTS``. The
rule (``choose``): among the rows that could be lesson 01's recipe (01's student trained with a teacher
term, ``CANDIDATES``) whose validation ratio is within 01's perplexity band, the one with the most validation
prompts at or under 01's repetition band (every new token written); ties go to the lower validation ratio.

Levers: which blocks/channels are kept (depth by Block Influence, width by activation), the loss
(CE only, forward KL with alpha 0.5 or 1 on the top-64 cache), on-policy steps (GKD, live teacher),
the training text (pydoc only, or half pydoc and half stdlib-code windows), the learning rate and
its schedule, and a hidden-state loss (DistilBERT's cosine) on the last or three kept blocks.

    python benchmarks/distill_levers.py [--only NAME ...] [--list] [--smoke]

About 1 min per row on 2 cores (on-policy and live-teacher rows ~1.5-2 min); all rows ~30 min. ``--smoke``
runs the smoke profile's sizes (8 steps of 2 x 64 tokens, 16 new tokens), a dry run of the script in minutes.
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
from distill_lab.data import HELD_OUT_PROMPTS, VALIDATION_PROMPTS  # noqa: E402
from distill_lab.distillation import (DistillationLoss, DistillationTrainer, HiddenStateLoss,  # noqa: E402
                                      TrainConfig, cache_teacher_logits)
from distill_lab.profiles import PROFILES  # noqa: E402
from distill_lab.pruning import StructuredConfig, prune_structured  # noqa: E402
from distill_lab.pruning.selection import as_batches  # noqa: E402
from distill_lab.pruning.structured import block_influence, select_layers  # noqa: E402

PLAN_STEPS = 32  # the step counts in ROWS are for this budget; another profile's budget scales them
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
# the rows that could be lesson 01's recipe: its student (chosen in 01 on validation windows before any
# training), trained with a teacher term (alpha > 0, on-policy or live-teacher steps)
LESSON_RECIPE = "01's student, KL a=0.5, cosine to 10 %"  # notebook 01's CHOSEN run ("forward KL, cosine")
CANDIDATES = [name for name, (student, plan) in ROWS.items()
              if student == C22 and any(phase != "none" and opt.get("alpha", 1.0) > 0 for phase, _, opt in plan)]


def choose(scores: dict[str, dict], bands: dict) -> str:
    """The row chosen on validation data alone: within ``bands["ppl_ratio"]`` on ``val_ratio``, the most
    ``val_pass`` (validation prompts at <= ``bands["rep4"]``), ties to the lower ``val_ratio``.

    ``scores`` maps a row name to its measures; only ``val_ratio`` and ``val_pass`` are read, so test
    windows and held-out prompts cannot move the choice."""
    fit = {name: sc for name, sc in scores.items() if sc["val_ratio"] <= bands["ppl_ratio"]}
    if not fit:
        ratios = {name: round(sc["val_ratio"], 2) for name, sc in scores.items()}
        raise ValueError(f"no row within the validation perplexity band ({bands['ppl_ratio']}); "
                         f"validation ratios: {ratios}")
    return min(fit, key=lambda name: (-fit[name]["val_pass"], fit[name]["val_ratio"]))


def rep4_shares(model, tok, prompts, new_tokens: int) -> list[tuple[float, int]]:
    """(repeated-4-gram share, tokens written) of up to ``new_tokens`` greedy tokens after each prompt."""
    outs = [dl.generate_continuations(model, tok, [p], max_new_tokens=new_tokens)[0]["ids"] for p in prompts]
    return [(dl.repeated_ngram_share(ids, 4), len(ids)) for ids in outs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows (names as in --list)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--smoke", action="store_true", help="the smoke profile's sizes: a dry run in minutes")
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
    profile = PROFILES["smoke" if args.smoke else "laptop"]
    lesson = profile.lesson("01")  # notebook 01's sizes and bands in this profile
    S, bands = dict(lesson["sizes"], new_tokens=profile.gen_tokens), lesson["bands"]
    teacher, tok = dl.load_teacher(device="cpu")
    pydoc = dl.corpus_windows("pydoc", "train", tok, S["seq"])
    code = dl.corpus_windows("stdlib-code", "train", tok, S["seq"])
    val = dl.corpus_windows("pydoc", "validation", tok, S["seq"])[:S["val_windows"]]  # choose on these
    test = dl.corpus_windows("pydoc", "test", tok, S["seq"])[:S["test_windows"]]  # report on these
    test_code = dl.corpus_windows("stdlib-code", "test", tok, S["seq"])[:S["test_windows"]]
    n = S["steps"] * S["batch"]
    train = pydoc[torch.randperm(len(pydoc), generator=torch.Generator().manual_seed(0))[:n]]  # as notebook 01
    code_pick = torch.randperm(len(code), generator=torch.Generator().manual_seed(0))[:n // 2]
    mixed = torch.cat([train[:n // 2], code[code_pick]])
    mixed = mixed[torch.randperm(n, generator=torch.Generator().manual_seed(1))]  # (n, seq): half of each corpus
    caches = {"cache": cache_teacher_logits(teacher, train, k=S["k"], batch_size=8, bf16="auto"),
              "mixed": cache_teacher_logits(teacher, mixed, k=S["k"], batch_size=8, bf16="auto")}
    t_ppl = {split: dl.perplexity(teacher, w, bf16="auto", progress=False)
             for split, w in (("val", val), ("test", test), ("code", test_code))}
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

    print(f"{profile.name} sizes: {S}\nteacher: pydoc validation {t_ppl['val']:.2f}, pydoc test {t_ppl['test']:.2f}, "
          f"stdlib-code test {t_ppl['code']:.2f}\n")
    n_val, n_held = len(VALIDATION_PROMPTS), len(HELD_OUT_PROMPTS)
    print(f"{'':46}{'chosen on (validation)':>24}  {'reported on (test, held-out)':>30}")
    print(f"{'row':40}{'fewer':>6}{'ratio':>7}{'rep4':>7}{'≤' + format(bands['rep4'], '.0%'):>10}  {'pydoc':>7}"
          f"{'code':>7}{'rep4':>7}{'≤' + format(bands['rep4'], '.0%'):>9}{'s':>5}")
    scores = {}
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
            steps = max(1, round(steps * S["steps"] / PLAN_STEPS))
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
        sc = {"val_ratio": dl.perplexity(s, val, bf16="auto", progress=False) / t_ppl["val"],
              "test_ratio": dl.perplexity(s, test, bf16="auto", progress=False) / t_ppl["test"],
              "code_ratio": dl.perplexity(s, test_code, bf16="auto", progress=False) / t_ppl["code"],
              "val_rep4": rep4_shares(s, tok, VALIDATION_PROMPTS, S["new_tokens"]),
              "held_rep4": rep4_shares(s, tok, HELD_OUT_PROMPTS, S["new_tokens"])}
        for split in ("val", "held"):  # a pass: at most the band, and every new token written (no early stop)
            sc[f"{split}_pass"] = sum(r <= bands["rep4"] and k == S["new_tokens"] for r, k in sc[f"{split}_rep4"])
            sc[f"{split}_mean"] = sum(r for r, _ in sc[f"{split}_rep4"]) / len(sc[f"{split}_rep4"])
        scores[name] = sc
        fewer = t_params / dl.parameter_count(s, "non_embedding")
        print(f"{name:40}{fewer:6.2f}{sc['val_ratio']:7.2f}{sc['val_mean']:7.0%}{sc['val_pass']:>5d} of {n_val:<2d}"
              f"  {sc['test_ratio']:7.2f}{sc['code_ratio']:7.2f}{sc['held_mean']:7.0%}{sc['held_pass']:>4d} of {n_held}"
              f"{seconds:5.0f}", flush=True)
    print(f"\n(fewer: non-embedding parameters, teacher / student; ratio: pydoc validation perplexity / the teacher's;"
          f" pydoc, code: test perplexity / the teacher's; rep4: mean share of repeated 4-grams in {S['new_tokens']}"
          f" greedy tokens after each of {n_val} validation or {n_held} held-out prompts (distill_lab.data);"
          f" ≤{bands['rep4']:.0%}: how many of those prompts are at most that, with all {S['new_tokens']} tokens written)")
    candidates = {name: scores[name] for name in CANDIDATES if name in scores}
    if candidates:
        pick = choose(candidates, bands)
        sc = scores[pick]
        print(f"\nchosen on validation, among {len(candidates)} of the {len(CANDIDATES)} candidate rows run (01's "
              f"student with a teacher term; within {bands['ppl_ratio']}x on validation windows, the most validation "
              f"prompts at ≤ {bands['rep4']:.0%}, ties to the lower ratio): {pick!r} ({sc['val_pass']} of {n_val})")
        print(f"reported on data the choice never saw: test ratio {sc['test_ratio']:.2f} (stdlib-code "
              f"{sc['code_ratio']:.2f}); held-out prompts at ≤ {bands['rep4']:.0%}: {sc['held_pass']} of {n_held}, "
              "shares " + ", ".join(f"{r:.0%}" for r, _ in sc["held_rep4"]))
        print(f"notebook 01's recipe ({LESSON_RECIPE!r}): "
              + ("the same row" if pick == LESSON_RECIPE else
                 "a different row: change 01's CHOSEN run to match, or say why not" if LESSON_RECIPE in candidates
                 else "not among the rows run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
