"""``TrainConfig``: how a distillation run trains, beside its trainer (as TRL keeps ``gkd_config.py``).

One self-validating dataclass read by ``DistillationTrainer``; ``pruning.heal``, ``quantization.qat.train_qat``
and the pipeline's distil step build one. Its on-policy fields (GKD) are checked by ``on_policy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..hardware import check_bf16
from . import on_policy as gkd
from .losses import _check_range

__all__ = ["SAMPLINGS", "SCHEDULES", "TrainConfig"]

SCHEDULES = ("warmup_cosine", "cosine", "constant")
SAMPLINGS = ("epochs", "random")


@dataclass
class TrainConfig:
    """How a distillation run trains; every field is checked in ``__post_init__``."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # windows per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 10  # linear warm-up steps, then cosine decay (schedule 'warmup_cosine' only)
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping
    # bf16 autocast for the student's forward (fp32 master weights); 'auto': if faster here. Off by
    # default, unlike the rest of the package: training numbers then do not depend on the machine.
    bf16: bool | str = False
    teacher_bf16: bool | str = "auto"  # bf16 autocast for a live teacher: True, False or 'auto' (measured here)
    eval_every: int = 0  # validation perplexity every N steps (and at 0 and the end); 0 = start and end
    eval_at: tuple[int, ...] = ()  # also after these steps: a budget curve from one run (constant schedule)
    eval_batch_size: int = 8  # windows per forward pass during evaluation
    checkpoint_dir: str | None = None  # where checkpoint.pt is written (atomically); None = no checkpoints
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none
    seed: int = 0  # seeds data order, init of new modules and torch's RNG
    progress: bool = True  # show a tqdm.auto progress bar
    # 'warmup_cosine': linear warm-up, then cosine to min_lr_ratio; 'cosine': cosine from the first step
    # (QAT's); 'constant': lr throughout (the former local healing loop's)
    schedule: str = "warmup_cosine"
    # 'epochs': a seeded permutation per epoch, by step number (resumable, no repeats within an epoch);
    # 'random': windows drawn with replacement from a generator seeded with seed (as data.sample_batch)
    sampling: str = "epochs"
    fused: bool = True  # the fused AdamW kernel where available (~8x faster on a CPU); False: the per-tensor loop
    reseed: bool = True  # seed torch's global RNG with seed at the start; False: leave the caller's RNG alone
    # on-policy distillation (GKD, on_policy.py): a step is on-policy with probability lmbda (a seeded coin)
    lmbda: float = 0.0  # in [0, 1]; 0 = the off-policy trainer exactly
    prompt_tokens: int = 32  # prompt = this prefix of each window
    gen_tokens: int = 32  # tokens the student samples per prompt; the loss counts these only
    sampling_temperature: float = 1.0  # how the student samples (GKD: 1, its own distribution); not the loss's

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}; allowed: an int >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; allowed: an int >= 0")
        self.eval_at = tuple(self.eval_at)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= self.steps for v in self.eval_at):
            raise ValueError(f"TrainConfig.eval_at={self.eval_at!r}; allowed: steps between 1 and steps={self.steps}")
        check_bf16(self.bf16, "TrainConfig", "bf16")
        check_bf16(self.teacher_bf16, "TrainConfig", "teacher_bf16")
        _check_range("TrainConfig.lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("TrainConfig.weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("TrainConfig.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("TrainConfig.max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs checkpoint_dir")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; allowed: {', '.join(map(repr, SCHEDULES))}")
        if self.warmup_steps and self.schedule != "warmup_cosine":
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} with schedule={self.schedule!r}; "
                             f"allowed: warmup_steps=0 (only 'warmup_cosine' warms up)")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"TrainConfig.sampling={self.sampling!r}; allowed: {', '.join(map(repr, SAMPLINGS))}")
        for name in ("fused", "reseed", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; allowed: True or False")
        gkd.check_on_policy_config(self)
