"""Run sizes for the course: ``smoke`` (CI, nbval), ``laptop`` (CPU default), ``gpu`` (CUDA default).

Every notebook reads its profile once, from the ``DISTILL_LAB_PROFILE`` environment variable,
so one notebook serves a CI smoke test, a 10-minute laptop run and a full GPU run.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["default_device", "ENV_VAR", "get_profile", "lesson_sizes", "LESSONS", "Profile", "PROFILES", "set_seed"]

ENV_VAR = "DISTILL_LAB_PROFILE"


@dataclass(frozen=True)
class Profile:
    """Sizes that set how long a lesson takes; one instance per profile name."""

    name: str
    seq_len: int  # tokens per evaluation / training window
    eval_windows: int  # windows used for perplexity (per corpus)
    batch_size: int  # windows per forward pass
    train_steps: int  # optimizer steps for distillation / QAT / healing
    train_batch_size: int  # windows per training step
    calib_windows: int  # calibration windows (Wanda, SmoothQuant, AWQ, importance)
    latency_batch: int  # batch for prefill speed
    latency_seq: int  # sequence length for prefill speed
    decode_tokens: int  # new tokens timed at batch 1
    repeats: int  # timing rounds: a ratio is the median of the per-round ratios, its spread the IQR (laptop: 5)
    gen_tokens: int  # tokens generated for samples
    recipe_steps: int = 8  # distillation steps per distil/qat step of a compression recipe (lesson 04, report)
    recipe_batch: int = 4  # windows per distillation step of a compression recipe
    recipe_eval_windows: int = 16  # pydoc test windows that score every step of a recipe (lesson 04, report)
    recipe_latency_batch: int = 4  # prefill batch (of latency_seq tokens) when a recipe times a step
    recipe_ood_windows: int = 16  # stdlib-code test windows (out of domain) that score every step of a recipe
    recipe_decode_tokens: int = 16  # new tokens a recipe's timing decodes at batch 1 (in each engine it times)

    def __post_init__(self):
        for field, value in asdict(self).items():
            if field != "name" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Profile.{field} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        """Return the profile as a plain dict (for JSON reports)."""
        return asdict(self)

    def lesson(self, lesson: str) -> dict:
        """Lesson ``lesson``'s own sizes and bands in this profile, e.g. ``profile.lesson("03")["heal_steps"]``."""
        return lesson_sizes(self, lesson)


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", seq_len=128, eval_windows=8, batch_size=8, train_steps=8,
                     train_batch_size=4, calib_windows=4, latency_batch=2, latency_seq=64,
                     decode_tokens=8, repeats=1, gen_tokens=16,
                     recipe_steps=4, recipe_batch=4, recipe_eval_windows=4, recipe_latency_batch=2,
                     recipe_ood_windows=4, recipe_decode_tokens=8),
    "laptop": Profile("laptop", seq_len=256, eval_windows=40, batch_size=8, train_steps=150,
                      train_batch_size=8, calib_windows=16, latency_batch=8, latency_seq=256,
                      decode_tokens=32, repeats=5, gen_tokens=40,
                      recipe_steps=30, recipe_batch=4, recipe_eval_windows=40, recipe_latency_batch=4,
                      recipe_ood_windows=8, recipe_decode_tokens=16),
    "gpu": Profile("gpu", seq_len=512, eval_windows=200, batch_size=16, train_steps=1500,
                   train_batch_size=16, calib_windows=64, latency_batch=8, latency_seq=256,
                   decode_tokens=64, repeats=5, gen_tokens=60,
                   recipe_steps=300, recipe_batch=16, recipe_eval_windows=200, recipe_latency_batch=8,
                   recipe_ood_windows=200, recipe_decode_tokens=64),
}


# Sizes and bands that belong to one lesson, per profile: the lesson reads its own with
# ``profile.lesson("02")``, so every size a run depends on lives in this file. They are not part of
# ``Profile.to_dict()`` (recipe records compare that dict to decide whether saved work is reused).
_SMOKE, _GPU = PROFILES["smoke"], PROFILES["gpu"]
# Where each band of lesson 02 comes from: the claim, or an earlier run plus a stated margin.
_02_BASIS = {"w8a8_band": "an earlier laptop run (AMD EPYC) measured +1.8 % for W8A8 + SmoothQuant; "
                          "the band adds about 1 point (the claim, < 1 %, is judged separately below)",
             "int4_band": "an earlier laptop run (AMD EPYC) measured +4.5 % for AWQ + GPTQ; the band adds "
                          "3.5 points (the claim, 1-3 %, is judged separately below)"}
_SMOKE_BASIS = {k: "smoke: 8 windows and 1 QAT step; wide enough for its noise, not a quality claim"
                for k in ("w8a8_band", "int4_band")}
# Lesson 04's bands: earlier laptop runs on the AMD EPYC plus a stated margin (the claims are judged in its table).
_04_BASIS = {"combined_ratio": "the laptop run on the AMD EPYC measured 1.48 on 40 windows (issue 31's recipe); the "
                               "band leaves room for another CPU's bf16 choices (2.5)",
             "heal_factor": "the laptop run healed 2.84 -> 1.33 (a factor of 2.1); the band asks for 2.0",
             "int4_after_heal": "the laptop run measured +11 % (1.33 -> 1.48) for int4 after healing; the band "
                                "allows +30 %: it catches a quantizer that got much worse"}
_04_SMOKE_BASIS = {k: "smoke: 4 distillation steps on 128-token windows; wide enough for its noise, not a claim"
                   for k in ("combined_ratio", "heal_factor", "int4_after_heal")}
# lesson 01's claims: the bands the laptop profile checks, each stated by the course, not fitted to a run
_CLAIM_01 = dict(param_ratio="the course's claim (non-embedding parameters, teacher / student), not fitted to a run",
                 ppl_ratio="the course's claim (test perplexity, student / teacher), not fitted to a run",
                 rep4="the course's claim (share of repeated 4-grams in each held-out prompt's greedy continuation), "
                      "not fitted to a run")
LESSONS: dict[str, dict[str, dict]] = {
    "00": {  # task_limit: documents scored per lm-eval task in section 4's accuracy check (None: all 300)
        "smoke": dict(task_limit=16),
        "laptop": dict(task_limit=None),
        "gpu": dict(task_limit=None),
    },
    "01": {  # 2 CPU cores: one student step costs about 1.5 s per 4 x 128 tokens
        # bands: what the lesson checks; basis: where each band comes from (printed by the lesson)
        "smoke": dict(sizes=dict(seq=64, batch=2, steps=8, warmup=1, eval_at=(2, 4, 6, 8), val_windows=8,
                                 test_windows=12, k=32, lr=1e-3, prompt=16, gen=16, held_out=2),
                      bands=dict(param_ratio=1.5, ppl_ratio=4.0, rep4=0.2), lab_steps=2,
                      basis=dict(param_ratio=_CLAIM_01["param_ratio"],
                                 ppl_ratio="an earlier smoke run (1.85, AMD EPYC, 2026-12-07) plus a margin of about "
                                           "2x: 8 steps of 2 x 64 tokens leave the student far from the teacher, "
                                           "and where it lands varies by CPU",
                                 rep4=_CLAIM_01["rep4"] + "; a smoke student is not expected to meet it, and a miss "
                                                          "prints ✗ without stopping the run")),
        "laptop": dict(sizes=dict(seq=128, batch=4, steps=32, warmup=4, eval_at=(4, 8, 16, 32), val_windows=24,
                                  test_windows=48, k=64, lr=3e-4, prompt=32, gen=32, held_out=6),
                       bands=dict(param_ratio=1.5, ppl_ratio=2.0, rep4=0.2), lab_steps=5, basis=dict(_CLAIM_01)),
        "gpu": dict(sizes=dict(seq=256, batch=16, steps=400, warmup=20, eval_at=(25, 50, 100, 200, 400),
                               val_windows=56, test_windows=80, k=128, lr=3e-4, prompt=64, gen=64, held_out=6),
                    bands=dict(param_ratio=1.5, ppl_ratio=1.5, rep4=0.2), lab_steps=20,
                    basis=dict(_CLAIM_01, ppl_ratio="the course's claim, tighter for the GPU profile's 100x the laptop's "
                                                    "training tokens; not fitted to a run (none on a GPU yet)")),
    },
    "02": {
        "smoke": dict(sizes=dict(eval_windows=_SMOKE.eval_windows, awq_grid=3, gptq=False, qat_steps=1,
                                 table_repeats=_SMOKE.repeats, w8a8_band=0.06, int4_band=0.25, qat_claim=False,
                                 band_basis=_SMOKE_BASIS)),
        "laptop": dict(sizes=dict(eval_windows=32, awq_grid=7, gptq=True, qat_steps=12, table_repeats=5,
                                  w8a8_band=0.03, int4_band=0.08, qat_claim=True, band_basis=_02_BASIS)),
        "gpu": dict(sizes=dict(eval_windows=_GPU.eval_windows, awq_grid=11, gptq=True, qat_steps=_GPU.train_steps // 8,
                               table_repeats=_GPU.repeats, w8a8_band=0.03, int4_band=0.08, qat_claim=True,
                               band_basis=_02_BASIS)),
    },
    "03": {  # timing: (prefill batch, decode tokens, rounds) of the size table's seven models
        "smoke": dict(sparsities=(0.5,), heal_steps=4, heal_seq=64, heal_batch=2, timing=(1, 4, 2)),
        "laptop": dict(sparsities=(0.3, 0.5, 0.6, 0.7), heal_steps=24, heal_seq=128, heal_batch=4, timing=(2, 16, 5)),
        "gpu": dict(sparsities=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8), heal_steps=300, heal_seq=512,
                    heal_batch=16, timing=(8, 64, 5)),
    },
    "04": {  # smoke distils 4 steps on 128-token windows, so its bands are wider; basis: where each band comes from
        # guard_lab: (test windows scored, heal steps, heal batch) of the quality-guard lab's crude recipe
        "smoke": dict(bands=dict(combined_ratio=20.0, heal_factor=1.5, int4_after_heal=1.5), basis=_04_SMOKE_BASIS,
                      guard_lab=(2, 2, 2)),
        "laptop": dict(bands=dict(combined_ratio=2.5, heal_factor=2.0, int4_after_heal=1.3), basis=_04_BASIS,
                       guard_lab=(2, 2, 4)),
        "gpu": dict(bands=dict(combined_ratio=2.5, heal_factor=2.0, int4_after_heal=1.3), basis=_04_BASIS,
                    guard_lab=(4, 4, 4)),
    },
}


def lesson_sizes(profile: Profile, lesson: str) -> dict:
    """A copy of ``lesson``'s sizes and bands in ``profile`` (``LESSONS``); ValueError names the known lessons."""
    if lesson not in LESSONS:
        raise ValueError(f"lesson={lesson!r}; allowed: {', '.join(LESSONS)}")
    return copy.deepcopy(LESSONS[lesson][profile.name])


def default_device() -> torch.device:
    """Return CUDA when a GPU is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_profile(name: str | None = None) -> Profile:
    """Return the named profile, else ``$DISTILL_LAB_PROFILE``, else ``gpu`` with CUDA and ``laptop`` without."""
    if name is None:
        name = os.environ.get(ENV_VAR) or ("gpu" if torch.cuda.is_available() else "laptop")
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; allowed: {', '.join(PROFILES)} "
                         f"(set with {ENV_VAR}=...)")
    return PROFILES[key]


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
