"""Cached top-k teacher logits for offline distillation, and what keeping only the top k costs.

The teacher runs once over the training windows; ``TeacherCache`` keeps its top-``k`` logits per
position (float16 values + int32 indices: ``k · 6`` bytes per token instead of ``V · 4``) and
writes them as one safetensors file, atomically. ``topk_fidelity`` measures the distillation term
from the top k against the full teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .._fs import atomic_file
from ..hardware import resolve_bf16
from ..runtime import autocast, device_of
from .losses import IGNORE_INDEX, DistillationLoss, TopKLogits

__all__ = ["TeacherCache", "cache_teacher_logits", "topk_fidelity"]


@dataclass
class TeacherCache:
    """Token windows with their teacher's top-k logits, ready for offline distillation."""

    windows: torch.Tensor  # (N, T) token ids
    values: torch.Tensor  # (N, T, k) float16 teacher logits (kd_temperature 1), descending
    indices: torch.Tensor  # (N, T, k) int32 vocabulary ids
    mass: torch.Tensor  # (N, T) float32 teacher probability (T = 1) covered by the top-k
    meta: dict = field(default_factory=dict)  # k, vocab_size, bf16, teacher name

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __len__(self) -> int:
        return len(self.windows)

    def topk(self, rows: torch.Tensor) -> TopKLogits:
        """Return the cached logits of the windows ``rows`` as ``TopKLogits``."""
        return TopKLogits(self.values[rows], self.indices[rows])

    def head(self, n: int) -> "TeacherCache":
        """The first ``n`` windows with their logits (the same tensors, sliced; ``self`` when it holds no more)."""
        if n >= len(self):
            return self
        return TeacherCache(self.windows[:n], self.values[:n], self.indices[:n], self.mass[:n], dict(self.meta))

    def nbytes(self) -> int:
        """Bytes taken by the cached logits (values, indices and mass; windows excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.mass))

    def full_vocab_nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the same windows would take as full-vocabulary logits."""
        n, T = self.windows.shape
        return n * T * int(self.meta["vocab_size"]) * torch.empty((), dtype=dtype).element_size()

    def save(self, path: str | Path) -> Path:
        """Write the cache as one safetensors file, atomically (``_fs.atomic_file``: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"windows": self.windows.contiguous(), "values": self.values.contiguous(),
                   "indices": self.indices.contiguous(), "mass": self.mass.contiguous()}
        with atomic_file(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in self.meta.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        """Read a cache written by ``save``."""
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in ("windows", "values", "indices", "mass")}
        for key in ("k", "vocab_size"):
            if key in meta:
                meta[key] = int(meta[key])
        return cls(meta=meta, **tensors)


@torch.no_grad()
def cache_teacher_logits(teacher: nn.Module, windows: torch.Tensor, k: int = 64,
                         path: str | Path | None = None, batch_size: int = 8, bf16: bool | str = "auto",
                         progress: bool = True) -> TeacherCache:
    """Run the teacher once over ``windows`` (N, T) and keep its top-``k`` logits per position.

    Stored as float16 values + int32 indices: ``k · 6`` bytes per token instead of ``V · 4``.
    With ``path`` the cache is also written as safetensors, atomically. ``bf16='auto'``: bf16
    autocast where it is measured faster on this machine (``distill_lab.hardware``).
    """
    if windows.dim() != 2:
        raise ValueError(f"windows: shape {tuple(windows.shape)}; allowed: (N, T)")
    vocab = teacher.config.vocab_size
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k={k!r}; allowed: an int in [1, {vocab}]")
    device = device_of(teacher)
    bf16 = resolve_bf16(bf16, device)  # the cache records what really ran
    was_training = teacher.training
    teacher.eval()
    values, indices, mass = [], [], []
    for batch in tqdm(windows.split(batch_size), desc=f"teacher top-{k}", leave=False,
                      disable=not progress):
        with autocast(device, bf16):
            logits = teacher(batch.to(device)).logits  # (b, T, V)
        logits = logits.float()
        v, i = logits.topk(k, dim=-1)  # (b, T, k)
        lse = torch.logsumexp(logits, -1, keepdim=True)  # (b, T, 1)
        mass.append((v - lse).exp().sum(-1).cpu())
        values.append(v.to(torch.float16).cpu())
        indices.append(i.to(torch.int32).cpu())
        del logits
    teacher.train(was_training)
    meta = {"k": k, "vocab_size": vocab, "bf16": bf16,
            "teacher": str(getattr(teacher.config, "name_or_path", "") or "")}
    cache = TeacherCache(windows.cpu().clone(), torch.cat(values), torch.cat(indices),
                         torch.cat(mass), meta)
    if path is not None:
        cache.save(path)
    return cache


@torch.no_grad()
def topk_fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  ks, loss: DistillationLoss) -> list[dict]:
    """For each k: bytes per token, teacher mass kept (at the loss's T), and the distillation term
    computed from top-k vs from the full teacher (absolute and relative error)."""
    V = teacher_logits.shape[-1]
    full_loss = DistillationLoss(loss.kd_temperature, 1.0, loss.kind, loss.beta, loss.chunk_size)
    _, parts = full_loss(student_logits, teacher_logits, labels, return_parts=True)
    full = parts["kd"]
    valid = labels != IGNORE_INDEX
    logq_T = torch.log_softmax(teacher_logits.float() / loss.kd_temperature, -1)  # (B, T, V)
    rows = []
    for k in ks:
        k = min(int(k), V)
        v, i = teacher_logits.float().topk(k, -1)
        mass = logq_T.gather(-1, i).exp().sum(-1)[valid].mean().item()
        _, parts = full_loss(student_logits, TopKLogits(v, i), labels, return_parts=True)
        rows.append({"k": k, "bytes_per_token": k * (2 + 4), "teacher_mass": mass,
                     "kd_full": full, "kd_topk": parts["kd"], "abs_error": abs(parts["kd"] - full),
                     "rel_error": abs(parts["kd"] - full) / max(abs(full), 1e-12)})
    return rows


