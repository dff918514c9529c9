"""On-policy distillation (GKD): the student is corrected by the teacher on text it wrote itself.

Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), arXiv:2306.13649; the trainer follows TRL's ``GKDTrainer``.

Why: off-policy distillation only shows the student prefixes written by someone else (the corpus,
or the teacher). When it generates, the student conditions on its *own* earlier tokens, which drift
away from anything it was trained on, and its mistakes compound ("exposure bias"). An on-policy step
lets the student sample a continuation and asks the teacher what it would predict at each sampled
token, so the student learns on exactly the states it visits.

How it fits ``DistillationTrainer`` (``TrainConfig.lmbda > 0``): each optimizer step is on-policy
with probability ``lmbda``, a coin seeded by ``(seed, step)`` (as TRL's per-step draw; a resumed run
or every DDP process flips the same coin). On such a step the first ``prompt_tokens`` of each window
are the prompt; the student samples ``gen_tokens`` more (eval mode, ``no_grad``, a seeded generator,
``sampling_temperature``, no stop token); the live teacher runs on prompt + generated ids; the loss's
divergence counts only the generated positions (labels -100 on the prompt). Off-policy steps are
the trainer's usual ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..runtime import autocast, device_of
from ..timing import stopwatch, sync
from .data import shift_labels
from .losses import IGNORE_INDEX, DistillationLoss

__all__ = ["check_on_policy_config", "check_on_policy_setup", "check_sampling_temperature", "generated_labels", "is_on_policy_step",
           "on_policy_batch", "on_policy_divergence", "on_policy_summary", "sample_continuations"]


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (the same parts always give the same seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def check_on_policy_config(cfg) -> None:
    """Check ``TrainConfig``'s on-policy fields: ``lmbda``, ``prompt_tokens``, ``gen_tokens``, ``sampling_temperature``."""
    lmbda = cfg.lmbda
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"TrainConfig.lmbda={lmbda!r}; allowed: a float in [0, 1] "
                         f"(the probability that a step is on-policy)")
    for name in ("prompt_tokens", "gen_tokens"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"TrainConfig.{name}={value!r}; allowed: an int >= 1")
    check_sampling_temperature(cfg.sampling_temperature, "TrainConfig.sampling_temperature")


def check_sampling_temperature(value, name: str = "sampling_temperature") -> None:
    """A sampling temperature is a finite float > 0 (1 samples from the model as it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}; allowed: a float > 0 and finite (1 samples from the model as it is)")


def check_on_policy_setup(cfg, loss, teacher: nn.Module | None, train, every_position: bool) -> None:
    """Reject a trainer that cannot run on-policy steps (nothing to check when ``cfg.lmbda == 0``)."""
    if cfg.lmbda == 0:
        return
    what = f"TrainConfig.lmbda={cfg.lmbda} (on-policy steps)"
    if teacher is None:
        raise ValueError(f"{what} needs a live teacher (teacher=...) to score the student's samples")
    if not (isinstance(train, torch.Tensor) and train.dim() == 2):
        raise ValueError(f"{what} takes its prompts from an (N, T) tensor of windows; allowed: windows, "
                         f"not a TeacherCache (no logits for new tokens) or a SequenceData")
    if every_position:
        raise ValueError(f"{what} put the loss on the generated positions only; allowed: every_position=False")
    if not isinstance(loss, DistillationLoss) or loss.alpha != 1:
        raise ValueError(f"{what} have no ground-truth labels for the student's own tokens; allowed: a "
                         f"DistillationLoss with alpha=1, got {loss!r}")
    if cfg.prompt_tokens > train.shape[1]:
        raise ValueError(f"TrainConfig.prompt_tokens={cfg.prompt_tokens}; allowed: an int in "
                         f"[1, {train.shape[1]}] (the window length)")


def is_on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step ``step`` is on-policy: a coin with P(heads) = ``lmbda``, seeded by (seed, step)."""
    if lmbda <= 0 or lmbda >= 1:  # no draw at all: lmbda=0 is exactly the off-policy trainer
        return lmbda >= 1
    coin = torch.Generator().manual_seed(_seed(seed, step, 0x6B64))
    return bool(torch.rand((), generator=coin) < lmbda)


@torch.no_grad()
def sample_continuations(model: nn.Module, prompts: torch.Tensor, gen_tokens: int,
                         sampling_temperature: float = 1.0,
                         generator: torch.Generator | None = None, bf16: bool | str = False) -> torch.Tensor:
    """Sample ``gen_tokens`` tokens after each prompt ``(B, P)``; return prompt + generated ids ``(B, P + G)``.

    Plain ancestral sampling from ``softmax(logits / sampling_temperature)`` (no top-k/top-p, no stop
    token), with a KV cache, in eval mode; the model's train/eval mode is restored afterwards.
    """
    check_sampling_temperature(sampling_temperature)
    was_training = model.training
    model.eval()
    try:
        with autocast(prompts.device, bf16, phase="decode"):  # token by token: decode's measured choice
            out = model(prompts, use_cache=True)
            new = []
            for i in range(gen_tokens):
                probs = torch.softmax(out.logits[:, -1].float() / sampling_temperature, -1)  # (B, V)
                new.append(torch.multinomial(probs, 1, generator=generator))  # (B, 1)
                if i + 1 < gen_tokens:  # feed the sampled token back with the KV cache ('cache' from transformers 5.2x)
                    key = "cache" if "cache" in out else "past_key_values"
                    out = model(new[-1], use_cache=True, **{key: out[key]})
    finally:
        model.train(was_training)
    return torch.cat([prompts, *new], 1)


def generated_labels(ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """Next-token labels of prompt + generated ids ``(B, P + G)``: the generated tokens, -100 elsewhere.

    ``labels[:, t] = ids[:, t + 1]`` for ``t`` in ``[P - 1, P + G - 2]`` (the G positions whose logits
    predict a generated token); the prompt's own next tokens and the last position are -100.
    """
    labels = shift_labels(ids)
    labels[:, :prompt_tokens - 1] = IGNORE_INDEX
    return labels


def on_policy_batch(student: nn.Module, windows: torch.Tensor, cfg, step: int, micro: int = 0,
                    rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One on-policy micro-batch from ``windows`` ``(b, T)``: (ids ``(b, P + G)``, labels, generation seconds).

    The generator is seeded by (seed, step, micro, rank), so a resumed run samples the same tokens.
    """
    device = windows.device
    gen = torch.Generator(device=device).manual_seed(_seed(cfg.seed, step, micro, rank))
    sync(device)
    elapsed = stopwatch()
    ids = sample_continuations(student, windows[:, :cfg.prompt_tokens], cfg.gen_tokens, cfg.sampling_temperature,
                               gen, cfg.bf16)
    sync(device)
    return ids, generated_labels(ids, cfg.prompt_tokens), elapsed()


@torch.no_grad()
def on_policy_divergence(student: nn.Module, teacher: nn.Module, prompts: torch.Tensor, gen_tokens: int,
                         loss: DistillationLoss | None = None, seed: int = 0,
                         sampling_temperature: float = 1.0) -> float:
    """The loss's divergence to the teacher on text the student generates from ``prompts`` ``(B, P)``.

    What on-policy distillation lowers: the student samples ``gen_tokens`` per prompt (seeded), the
    teacher scores them, and ``D(teacher, student)`` is averaged over the generated positions only.
    ``sampling_temperature`` is how the student samples; the loss's own ``kd_temperature`` softens the
    divergence (default ``DistillationLoss(alpha=1)``, at ``KD_TEMPERATURE``).
    """
    loss = loss or DistillationLoss(alpha=1.0)
    device = device_of(student)
    prompts = prompts.to(device)
    gen = torch.Generator(device=device).manual_seed(_seed(seed, 0x65766C))
    ids = sample_continuations(student, prompts, gen_tokens, sampling_temperature, gen)
    was_training = student.training
    student.eval()
    s_logits, t_logits = student(ids).logits.float(), teacher(ids.to(device_of(teacher))).logits.float()
    student.train(was_training)
    _, parts = loss(s_logits, t_logits.to(device), generated_labels(ids, prompts.shape[1]), return_parts=True)
    return parts["kd"]


def on_policy_summary(history: dict) -> dict:
    """Totals of a run's history: steps, on-policy steps and fraction, seconds and generation seconds."""
    rows = history["train"]
    on = int(sum(r.get("on_policy", 0.0) for r in rows))  # each step is all on-policy or all off-policy
    return {"steps": len(rows), "on_policy_steps": on, "on_policy_fraction": on / max(len(rows), 1),
            "seconds": sum(r["seconds"] for r in rows), "gen_seconds": sum(r.get("gen_seconds", 0.0) for r in rows),
            "tokens": sum(r["tokens"] for r in rows)}
