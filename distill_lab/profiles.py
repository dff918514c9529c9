"""Run sizes for the course: ``smoke`` (CI, nbval), ``laptop`` (CPU default), ``gpu`` (CUDA default).

Every notebook reads its profile once, from the ``DISTILL_LAB_PROFILE`` environment variable,
so one notebook serves a CI smoke test, a 10-minute laptop run and a full GPU run.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

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
    repeats: int  # timing repeats (median is reported)
    gen_tokens: int  # tokens generated for samples
    recipe_steps: int = 8  # distillation steps per distil/qat step of a compression recipe (lesson 04, report)
    recipe_batch: int = 4  # windows per distillation step of a compression recipe
    recipe_eval_windows: int = 16  # test windows per corpus that score every step of a recipe (lesson 04, report)
    recipe_latency_batch: int = 4  # prefill batch (of latency_seq tokens) when a recipe times a step

    def __post_init__(self):
        for field, value in asdict(self).items():
            if field != "name" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Profile.{field} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        """Return the profile as a plain dict (for JSON reports)."""
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", seq_len=128, eval_windows=8, batch_size=8, train_steps=8,
                     train_batch_size=4, calib_windows=4, latency_batch=2, latency_seq=64,
                     decode_tokens=8, repeats=1, gen_tokens=16,
                     recipe_steps=4, recipe_batch=4, recipe_eval_windows=4, recipe_latency_batch=2),
    "laptop": Profile("laptop", seq_len=256, eval_windows=40, batch_size=8, train_steps=150,
                      train_batch_size=8, calib_windows=16, latency_batch=8, latency_seq=256,
                      decode_tokens=32, repeats=3, gen_tokens=40,
                      recipe_steps=30, recipe_batch=4, recipe_eval_windows=16, recipe_latency_batch=4),
    "gpu": Profile("gpu", seq_len=512, eval_windows=200, batch_size=16, train_steps=1500,
                   train_batch_size=16, calib_windows=64, latency_batch=8, latency_seq=256,
                   decode_tokens=64, repeats=5, gen_tokens=60,
                   recipe_steps=300, recipe_batch=16, recipe_eval_windows=200, recipe_latency_batch=8),
}


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
