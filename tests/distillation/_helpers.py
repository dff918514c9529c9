"""Shared helpers of the distillation tests: random logits, tiny windows, a short training run."""

import torch

from distill_lab.distillation import DistillationTrainer, TrainConfig


def random_case(B=3, T=7, V=50, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * scale
    teacher = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # padding / prompt positions
    labels[:, -1] = -100  # the last position has no next token
    return student, teacher, labels


def tiny_data(n=32, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, T), generator=g), torch.randint(0, 256, (4, T), generator=g)


def run(student, train, steps=6, **kwargs):
    cfg_kwargs = dict(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, teacher_bf16=False,
                      progress=False)
    cfg_kwargs.update(kwargs.pop("cfg", {}))
    trainer = DistillationTrainer(student, train, config=TrainConfig(**cfg_kwargs), **kwargs)
    return trainer, trainer.train()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
