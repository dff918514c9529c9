"""What a step may use (teacher, data, profile) and how saved work is recognised
(the digest of a model's weights, the version of the package's code).
"""

from __future__ import annotations

import functools
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import calibration_batches, corpus_windows
from ..profiles import Profile

__all__ = ["StepContext", "code_version", "model_digest"]


# ----------------------------------------------------------------------------------------------
# Context: what a step may use (teacher, data, profile)
# ----------------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What a step may use: the teacher, its tokenizer, the profile, data, seed and device."""

    teacher: nn.Module  # the uncompressed teacher (never modified)
    tokenizer: object  # the teacher's tokenizer (None for tiny test models)
    profile: Profile  # sizes (train steps, batch, calibration windows, ...)
    seed: int = 0  # seed for every step
    progress: bool = True  # show tqdm bars
    train: torch.Tensor | None = None  # (N, T) training windows (loaded lazily from pydoc train)
    work_dir: Path | None = None  # the recipe's output folder
    cache_dir: Path | None = None  # where cached teacher logits go (shared between recipes; default work_dir)
    extras: dict = field(default_factory=dict)  # what the current step reports besides metrics (losses, notes)
    teacher_digest: str = ""  # model_digest(teacher): keys the cached teacher logits to this very teacher

    def report(self, key: str, value) -> None:
        """Attach JSON-serializable information to the current step's record (e.g. a loss history)."""
        self.extras[key] = value

    def train_windows(self) -> torch.Tensor:
        """(N, T) training windows from the pydoc train split (cached)."""
        if self.train is None:

            self.train = corpus_windows("pydoc", "train", self.tokenizer, self.profile.seq_len)
        return self.train

    def calibration(self, n: int | None = None) -> list[torch.Tensor]:
        """Calibration batches of training windows (``profile.calib_windows`` by default)."""

        n = n or self.profile.calib_windows
        return calibration_batches(self.train_windows(), n, self.profile.batch_size, seed=self.seed)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's Python sources: saved steps and teacher measurements from other code are not reused."""
    package = Path(__file__).resolve().parents[1]  # distill_lab/, not just distill_lab/pipeline/
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex) of a model's state: names, dtypes, shapes and bytes of every tensor.

    Saved steps and cached teacher logits record the digest of the model they came from, so work
    done on one input model is never reused for another. The result is remembered on the model
    until one of its tensors changes (tensor version counters).
    """
    state = model.state_dict()
    key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = getattr(model, "_distill_lab_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    value = digest.hexdigest()[:16]
    try:
        object.__setattr__(model, "_distill_lab_digest", (key, value))
    except (AttributeError, TypeError):
        pass
    return value


def _notice(message: str) -> None:
    """One line on stderr (printed even with progress bars off)."""
    print(f"distill_lab: {message}", file=sys.stderr)
