"""The package's one training loop: ``DistillationTrainer`` (distillation, healing a pruned model, QAT).

AdamW with a learning-rate schedule, gradient accumulation and clipping, a live teacher or a
``TeacherCache``, validation perplexity, atomic checkpoints with exact resume, DDP under ``torchrun``,
and on-policy steps (GKD, ``TrainConfig.lmbda``; see ``on_policy``). ``pruning.heal`` and
``quantization.qat.train_qat`` are thin callers of this trainer; the options they need (a schedule,
windows drawn with replacement, every position without labels, a plain loss callable, leaving the
caller's RNG and teacher alone) are fields of ``TrainConfig`` (``train_config``) or arguments of the trainer.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._fs import atomic_file
from ..evaluate import perplexity
from ..models import check_vocab_compatible
from ..runtime import autocast, device_of
from ..timing import stopwatch
from . import on_policy as gkd
from .cache import TeacherCache
from .data import SequenceData, shift_labels
from .losses import IGNORE_INDEX, DistillationLoss, HiddenStateLoss
from .train_config import TrainConfig

__all__ = ["DistillationTrainer", "NonFiniteLossError", "distributed_context",
           "final_val_ppl", "lr_factor"]

def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float,
              schedule: str = "warmup_cosine") -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) under ``schedule`` (see ``TrainConfig``)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":  # QAT's formula, kept as it was so that its numbers do not move
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distributed_context() -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA); return (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Trainable(nn.Module):
    """The student plus the hidden-loss projection: one module for DDP, the optimizer and checkpoints."""

    def __init__(self, student: nn.Module, hidden: HiddenStateLoss | None):
        super().__init__()
        self.student = student
        self.hidden = hidden

    def forward(self, input_ids):
        return self.student(input_ids, output_hidden_states=self.hidden is not None)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(a) if isinstance(a, np.ndarray) else a
                       for a in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DistillationTrainer:
    """Train a student on token windows with a live teacher, a ``TeacherCache``, or labels alone.

    ``train`` is a ``(N, T)`` tensor of windows (live teacher or CE only), a ``TeacherCache``
    (offline top-k distillation) or a ``SequenceData`` (sequence-level KD). With the default
    ``sampling='epochs'`` the data order is a seeded permutation per epoch, derived from the step
    number alone, so a resumed run sees exactly the batches the uninterrupted run would
    (``'random'`` draws with replacement; its generator is checkpointed). Under ``torchrun`` the
    student is wrapped in DDP and each process takes its own slice of every global batch.

    ``loss`` is a ``DistillationLoss`` (default: ``DistillationLoss()``), called with next-token labels
    (the last position and padding excluded), or with ``every_position=True`` without labels on
    every position (distillation only, ``alpha = 1``). It may also be any callable
    ``loss(student_logits, teacher_logits) -> scalar`` on float32 ``(B, T, V)`` logits, which needs
    ``every_position=True`` and a live teacher. ``freeze_teacher=False`` leaves the teacher's
    ``requires_grad`` flags alone (it runs under ``no_grad`` either way); ``desc`` names the progress bar;
    ``eval_after=True`` puts the student in eval mode when ``train`` returns or raises.
    ``config.lmbda > 0`` makes steps on-policy (``on_policy``: the student's samples, a live teacher).
    """

    def __init__(self, student: nn.Module, train, *, teacher: nn.Module | None = None,
                 loss=None, config: TrainConfig | None = None,
                 val_windows: torch.Tensor | None = None, hidden: HiddenStateLoss | None = None,
                 callbacks=(), every_position: bool = False, freeze_teacher: bool = True,
                 desc: str | None = None, eval_after: bool = False):
        self.config = config or TrainConfig()
        self.loss = loss if loss is not None else DistillationLoss()
        self.teacher = teacher
        self.val_windows = val_windows
        self.callbacks = list(callbacks)  # each called as fn(trainer, step, row) after a step
        self.every_position = every_position
        self.desc = desc
        self.eval_after = eval_after
        self.cache = train if isinstance(train, TeacherCache) else None
        if isinstance(train, SequenceData):
            self.inputs, self.labels = train.input_ids, train.labels
        elif isinstance(train, TeacherCache):
            self.inputs, self.labels = train.windows, None
        elif isinstance(train, torch.Tensor) and train.dim() == 2:
            self.inputs, self.labels = train, None
        else:
            raise ValueError("train: allowed a (N, T) tensor of windows, a TeacherCache or a SequenceData")
        self._check_loss(teacher, hidden)
        gkd.check_on_policy_setup(self.config, self.loss, teacher, train, every_position)
        if self.needs_teacher and teacher is None and self.cache is None:
            raise ValueError(f"loss alpha={self.loss.alpha} needs a teacher or a TeacherCache; "
                             f"use alpha=0 to train on labels alone")
        if hidden is not None and teacher is None:
            raise ValueError("hidden-state loss needs a live teacher (teacher=...)")
        if teacher is not None:
            check_vocab_compatible(teacher, student)
            teacher.eval()
            if freeze_teacher:
                teacher.requires_grad_(False)
        self.rank, self.world = distributed_context()
        cfg = self.config
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        if cfg.sampling == "epochs" and per_step > len(self.inputs):
            raise ValueError(f"batch_size·grad_accum·world = {per_step} windows per step, but only "
                             f"{len(self.inputs)} training windows; allowed: at most {len(self.inputs)}")
        self.device = device_of(student)
        self.student = student
        if cfg.reseed:
            torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # sampling='random' draws from it
        if hidden is not None:
            hidden.to(self.device)
        self.module = _Trainable(student, hidden)
        self.model = self.module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = None
        if cfg.fused:
            try:  # the fused kernel is one pass over the weights: ~8x faster than the loop on a CPU
                self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
            except (RuntimeError, ValueError):
                pass
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.schedule))
        self.step = 0
        self.history: dict[str, list[dict]] = {"train": [], "eval": []}

    def _check_loss(self, teacher, hidden) -> None:
        """Reject a loss that cannot run on this data: every_position and plain callables need KD alone."""
        if not isinstance(self.loss, DistillationLoss):
            if not callable(self.loss):
                raise ValueError(f"loss={self.loss!r}; allowed: a DistillationLoss or a callable "
                                 f"loss(student_logits, teacher_logits)")
            if not self.every_position or teacher is None:
                raise ValueError("a loss callable sees every position and the live teacher's logits; "
                                 "allowed with every_position=True and teacher=...")
        if self.every_position:
            if self.labels is not None:
                raise ValueError("every_position=True: allowed with windows or a TeacherCache (a SequenceData "
                                 "has labels that choose its positions)")
            if isinstance(self.loss, DistillationLoss) and self.loss.alpha != 1:
                raise ValueError(f"every_position=True has no labels, so it needs alpha=1 (no CE term); "
                                 f"got alpha={self.loss.alpha}")

    @property
    def needs_teacher(self) -> bool:
        """True when the loss has a distillation term (a plain callable always has)."""
        return self.loss.needs_teacher if isinstance(self.loss, DistillationLoss) else True

    # -- data
    def _batch_rows(self, step: int, micro: int) -> torch.Tensor:
        """Row indices of this process's micro-batch: a seeded per-epoch permutation, by position
        (``sampling='epochs'``), or draws with replacement (``'random'``)."""
        cfg, n = self.config, len(self.inputs)
        if cfg.sampling == "random":
            rows = torch.randint(0, n, (cfg.batch_size * self.world,), generator=self.generator)
            return rows[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        start = (step * cfg.grad_accum + micro) * cfg.batch_size * self.world + self.rank * cfg.batch_size
        positions = torch.arange(start, start + cfg.batch_size)
        epochs = positions // n
        rows = torch.empty_like(positions)
        for e in epochs.unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + e))
            sel = epochs == e
            rows[sel] = perm[positions[sel] % n]
        return rows

    # -- one optimizer step
    def _micro_step(self, rows: torch.Tensor, scale: float, micro: int = 0, on_policy: bool = False) -> dict:
        cfg = self.config
        ids = self.inputs[rows].to(self.device)  # (b, T)
        labels, gen_seconds = None, 0.0
        if on_policy:  # the student continues each prompt; labels only on its tokens: (b, P + G)
            ids, labels, gen_seconds = gkd.on_policy_batch(self.student, ids, cfg, self.step, micro, self.rank)
        elif not self.every_position:
            labels = self.labels[rows].to(self.device) if self.labels is not None else shift_labels(ids)
        teacher_out, t_hidden = None, None
        if self.needs_teacher or self.module.hidden is not None:
            if self.cache is not None:
                teacher_out = self.cache.topk(rows).to(self.device)
            else:
                with torch.no_grad(), autocast(self.device, cfg.teacher_bf16):
                    out = self.teacher(ids, output_hidden_states=self.module.hidden is not None)
                teacher_out = out.logits
                t_hidden = out.hidden_states
        with autocast(self.device, cfg.bf16):
            out = self.model(ids)
        if isinstance(self.loss, DistillationLoss):
            loss, parts = self.loss(out.logits, teacher_out if self.needs_teacher else None, labels,
                                    return_parts=True)
        else:
            loss, parts = self.loss(out.logits.float(), teacher_out.float()), {}
        kept = labels != IGNORE_INDEX if labels is not None else None
        if self.module.hidden is not None:
            h = self.module.hidden(out.hidden_states, t_hidden, kept)
            parts["hidden"] = float(h.detach())
            loss = loss + self.module.hidden.weight * h
        (loss * scale).backward()
        parts["loss"] = float(loss.detach())
        return {**parts, "tokens": int(kept.sum()) if kept is not None else ids.numel(), "gen_seconds": gen_seconds}

    def train_step(self) -> dict:
        """Run one optimizer step (with accumulation and clipping) and return its history row.

        A loss that is NaN or infinite raises ``NonFiniteLossError`` naming the step, before the
        optimizer moves: the weights stay those of the step before, and nothing is saved.
        """
        cfg = self.config
        self.module.train()
        elapsed = stopwatch()
        rows_parts, on_policy = [], gkd.is_on_policy_step(cfg.seed, self.step, cfg.lmbda)
        for micro in range(cfg.grad_accum):
            rows = self._batch_rows(self.step, micro)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            with self.model.no_sync() if not sync else contextlib.nullcontext():
                rows_parts.append(self._micro_step(rows, 1.0 / cfg.grad_accum, micro, on_policy))
        self._check_finite([p["loss"] for p in rows_parts])
        params = [p for p in self.module.parameters() if p.grad is not None]
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        row = {"step": self.step, "lr": lr, "grad_norm": grad_norm,
               "seconds": elapsed(),  # the whole step, generation included
               "tokens": sum(p["tokens"] for p in rows_parts) * self.world,
               "on_policy": float(on_policy), "gen_seconds": sum(p.pop("gen_seconds") for p in rows_parts)}
        for key in rows_parts[0]:
            if key != "tokens":
                row[key] = sum(p[key] for p in rows_parts) / len(rows_parts)
        if self.world > 1:  # report the mean over processes
            keys = [k for k in ("loss", "kd", "ce", "hidden") if k in row]
            t = torch.tensor([row[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            row.update({k: float(v) / self.world for k, v in zip(keys, t)})
        self.history["train"].append(row)
        return row

    def _check_finite(self, losses: list[float]) -> None:
        bad = next((x for x in losses if not math.isfinite(x)), None)
        if self.world > 1:  # every process stops together
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
            dist.all_reduce(flag)
            bad = bad if bad is not None else (float("nan") if flag.item() > 0 else None)
        if bad is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        source = "the cached teacher logits" if self.cache is not None else "the teacher"
        raise NonFiniteLossError(
            f"training stopped at step {self.step + 1} of {self.config.steps}: the loss is {bad} (not finite); the "
            f"weights are those after step {self.step} and nothing was saved for this step (check the student's "
            f"weights and {source} for NaN or Inf, or lower lr={self.config.lr:g})")

    def evaluate(self) -> float:
        """Validation perplexity of the student (identical on every process)."""
        self.module.eval()
        ppl = perplexity(self.student, self.val_windows, batch_size=self.config.eval_batch_size,
                         bf16=self.config.bf16, progress=False)
        self.history["eval"].append({"step": self.step, "val_ppl": ppl})
        return ppl

    # -- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / "checkpoint.pt" if self.config.checkpoint_dir else None

    def save_checkpoint(self) -> Path | None:
        """Write student (+ projection), optimizer, scheduler, RNG, step and history atomically (rank 0)."""
        path = self.checkpoint_path
        if path is None:
            return None
        if self.rank == 0:
            state = {"step": self.step, "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": _rng_state(), "sampler": self.generator.get_state(), "history": self.history,
                     "config": asdict(self.config)}
            with atomic_file(path) as tmp:  # a kill never leaves a half-written checkpoint
                torch.save(state, tmp)
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint if there is one; return True when it did."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if "sampler" in state:
            self.generator.set_state(state["sampler"].cpu())
        self.step = int(state["step"])
        self.history = state["history"]
        return True

    # -- the loop
    def train(self, resume: bool = False) -> dict[str, list[dict]]:
        """Train to ``config.steps`` (continuing from the checkpoint when ``resume``); return the history."""
        cfg = self.config
        if not (resume and self.load_checkpoint()) and cfg.reseed:
            torch.manual_seed(cfg.seed)
        if self.val_windows is not None and self.step == 0 and not self.history["eval"]:
            self.evaluate()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc or f"train ({self._mode()})",
                   disable=not cfg.progress or self.rank != 0, leave=False)
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                last = self.step == cfg.steps
                if self.val_windows is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                                     or last or self.step in cfg.eval_at):
                    row["val_ppl"] = self.evaluate()
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last):
                    self.save_checkpoint()
                for fn in self.callbacks:
                    fn(self, self.step, row)
        finally:
            if self.eval_after:
                self.student.eval()
        bar.close()
        return self.history

    def _mode(self) -> str:
        if not self.needs_teacher:
            return "CE only"
        kind = self.loss.kind if isinstance(self.loss, DistillationLoss) else "custom loss"
        source = f"cached top-{self.cache.k}" if self.cache is not None else "live teacher"
        return f"{kind}, {source}"


class NonFiniteLossError(RuntimeError):
    """A training step's loss was NaN or infinite: the trainer stops before the optimizer step."""


def final_val_ppl(history: dict) -> float:
    """The last validation perplexity of a run's history."""
    return history["eval"][-1]["val_ppl"]
