"""Knowledge distillation: losses, cached teacher logits, a trainer, sequence-level data.

* Soft targets at a temperature (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
  Neural Network", arXiv:1503.02531): ``alpha · T² · KL(p_teacher^T ‖ p_student^T) + (1 − alpha) · CE``.
* Reverse KL ``KL(p_student ‖ p_teacher)``, mode-seeking (Gu et al., 2024, "MiniLLM",
  arXiv:2306.08543), and the generalized Jensen-Shannon divergence with a ``beta`` (Agarwal et al.,
  2024, "On-Policy Distillation of Language Models" (GKD), arXiv:2306.13649).
* A hidden-state loss (cosine or MSE, with a projection when widths differ) and the layer-dropped
  student init from DistilBERT (Sanh et al., 2019, arXiv:1910.01108).
* Offline distillation from cached top-k teacher logits (as in sparse / "top-k" KD), and
  sequence-level KD on teacher-generated text (Kim & Rush, 2016, arXiv:1606.07947).

The loss computes its gradient in the forward pass, chunk by chunk over tokens, so that beyond the
logits themselves it keeps exactly one extra ``(B, T, V)`` tensor (the gradient) plus
``(chunk_size, V)`` temporaries: a 49k vocabulary fits on a laptop.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hardware import check_bf16, resolve_bf16

IGNORE_INDEX = -100
KINDS = ("forward_kl", "reverse_kl", "jsd")


# --------------------------------------------------------------------------- the loss


@dataclass
class TopKLogits:
    """A teacher's top-k logits per position: values ``(B, T, k)`` (at temperature 1) and vocabulary indices.

    Missing probability mass: the distillation loss renormalises the teacher over its top-k tokens,
    i.e. ``q_k = softmax(values / T)`` over the k kept tokens and 0 elsewhere; the dropped mass is
    shared out in proportion. Forward KL then compares that truncated teacher with the student's
    full-vocabulary distribution; reverse KL and JSD (which are infinite where the truncated teacher
    is 0) compare it with the student renormalised over the same k tokens. With ``k = V`` every kind
    equals the live-teacher loss exactly. ``topk_fidelity`` measures what is lost for smaller k.
    """

    values: torch.Tensor  # (B, T, k) float, teacher logits at temperature 1, descending
    indices: torch.Tensor  # (B, T, k) int, vocabulary ids of those logits

    def __post_init__(self):
        if self.values.shape != self.indices.shape or self.values.dim() != 3:
            raise ValueError(f"TopKLogits: values {tuple(self.values.shape)} and indices "
                             f"{tuple(self.indices.shape)} must both be (B, T, k)")

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def to(self, device) -> "TopKLogits":
        """Return a copy on ``device`` (indices as int64, ready for ``gather``)."""
        return TopKLogits(self.values.to(device), self.indices.to(device=device, dtype=torch.long))


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name}={value!r}; allowed: {lo} and <= {high}")


class DistillationLoss(nn.Module):
    """``alpha · T² · D(p_teacher^T, p_student^T) + (1 − alpha) · CE(student, labels)``, averaged over tokens.

    ``D`` is chosen by ``kind``: ``"forward_kl"`` = KL(teacher ‖ student) (Hinton et al.),
    ``"reverse_kl"`` = KL(student ‖ teacher) (MiniLLM), ``"jsd"`` = the generalized JSD of GKD,
    ``beta · KL(teacher ‖ m) + (1 − beta) · KL(student ‖ m)`` with ``m = beta · teacher +
    (1 − beta) · student``; as in TRL's GKD trainer, ``beta = 0`` is defined as the forward KL and
    ``beta = 1`` as the reverse KL (the unscaled JSD tends to 0 at both ends; JSD/beta tends to the
    forward KL and JSD/(1 − beta) to the reverse KL). The CE term uses temperature 1.

    ``labels`` are aligned with the logits (``labels[b, t]`` is the target of ``logits[b, t]``, so a
    causal LM passes its inputs shifted left by one); positions labelled -100 (padding, prompts, the
    last position) count in neither term. "batchmean over tokens": both terms are sums over the
    kept positions divided by their number.
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward_kl",
                 beta: float = 0.5, chunk_size: int | None = 128):
        super().__init__()
        _check_range("temperature", temperature, 0.0, math.inf, low_open=True)
        _check_range("alpha", alpha, 0.0, 1.0)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; allowed: {', '.join(repr(k) for k in KINDS)}")
        _check_range("beta", beta, 0.0, 1.0)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r}; allowed: a positive int (tokens per chunk) or None")
        self.temperature = float(temperature)  # softening temperature T > 0
        self.alpha = float(alpha)  # weight of the distillation term, in [0, 1]
        self.kind = kind  # "forward_kl" | "reverse_kl" | "jsd"
        self.beta = float(beta)  # JSD interpolation in [0, 1] (only for kind="jsd")
        self.chunk_size = chunk_size  # tokens per chunk; None = all at once

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, kind={self.kind!r}, "
                f"beta={self.beta}, chunk_size={self.chunk_size}")

    @property
    def needs_teacher(self) -> bool:
        """True when the loss has a distillation term (alpha > 0)."""
        return self.alpha > 0

    def forward(self, student_logits: torch.Tensor, teacher_logits=None,
                labels: torch.Tensor | None = None, return_parts: bool = False):
        """Loss for student logits ``(B, T, V)`` and teacher logits ``(B, T, V)`` or ``TopKLogits``.

        With ``return_parts=True`` it returns ``(loss, {"kd": D, "ce": CE})`` (both unweighted, detached).
        """
        self._check_inputs(student_logits, teacher_logits, labels)
        stats = torch.zeros(2, dtype=torch.float64)
        loss = _DistillFunction.apply(student_logits, teacher_logits, labels, self, stats)
        if return_parts:
            return loss, {"kd": float(stats[0]), "ce": float(stats[1])}
        return loss

    def _check_inputs(self, student, teacher, labels) -> None:
        if student.dim() != 3:
            raise ValueError(f"student_logits: shape {tuple(student.shape)}; allowed: (B, T, V)")
        B, T, V = student.shape
        if labels is not None and tuple(labels.shape) != (B, T):
            raise ValueError(f"labels: shape mismatch, {tuple(labels.shape)} vs logits (B, T) = {(B, T)}")
        if labels is not None:
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"labels.dtype={labels.dtype}; allowed: an integer tensor of token ids")
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise ValueError(f"labels hold {int(bad.sum())} value(s) such as {int(labels[bad][0])}; allowed: "
                                 f"token ids in [0, {V - 1}] or {IGNORE_INDEX} (ignored)")
        if labels is None and self.alpha < 1:
            raise ValueError(f"labels=None needs alpha=1 (no CE term); got alpha={self.alpha}")
        if self.alpha == 0:
            return
        if teacher is None:
            raise ValueError(f"teacher_logits=None needs alpha=0 (CE only); got alpha={self.alpha}")
        if isinstance(teacher, TopKLogits):
            if tuple(teacher.values.shape[:2]) != (B, T):
                raise ValueError(f"teacher top-k: shape mismatch, {tuple(teacher.values.shape)} vs "
                                 f"student (B, T) = {(B, T)}")
            if teacher.k > V:
                raise ValueError(f"teacher top-k: vocabulary mismatch, k={teacher.k} > student vocab {V}")
            if teacher.indices.numel() and int(teacher.indices.max()) >= V:
                raise ValueError(f"teacher top-k: vocabulary mismatch, index {int(teacher.indices.max())} "
                                 f">= student vocab {V}")
            return
        if teacher.dim() != 3 or tuple(teacher.shape[:2]) != (B, T):
            raise ValueError(f"teacher_logits: shape mismatch, {tuple(teacher.shape)} vs student {(B, T, V)}")
        if teacher.shape[2] != V:
            raise ValueError(f"teacher_logits: vocabulary mismatch, teacher V={teacher.shape[2]}, "
                             f"student V={V}")


def _divergence(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence ``D(q, p)`` for student log-probs ``logp`` and teacher ``logq`` (c, V'),
    and its gradient with respect to the student's (temperature-scaled) logits, shape (c, V')."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    p = logp.exp()  # (c, V')
    if kind == "forward_kl":
        q = logq.exp()
        d = (q * (logq - logp)).sum(-1)  # (c,)
        return d, (p - q if need_grad else None)
    if kind == "reverse_kl":
        f = logp - logq
        d = (p * f).sum(-1)
        return d, (p * (f - d[:, None]) if need_grad else None)
    # generalized JSD: m = beta q + (1 - beta) p; dD/dp_i = (1 - beta)(log p_i - log m_i)
    q = logq.exp()
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    d = beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
    if not need_grad:
        return d, None
    g = (1 - beta) * (logp - logm)
    return d, p * (g - (p * g).sum(-1, keepdim=True))


class _DistillFunction(torch.autograd.Function):
    """Computes the loss and, chunk by chunk, its gradient w.r.t. the student logits (saved for backward)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, loss: DistillationLoss, stats):
        B, T, V = student.shape
        need_grad = ctx.needs_input_grad[0]
        cdtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        flat = student.reshape(B * T, V)  # a view for contiguous logits
        lab = labels.reshape(-1) if labels is not None else None
        valid = (lab != IGNORE_INDEX) if lab is not None else torch.ones(B * T, dtype=torch.bool,
                                                                          device=student.device)
        n = int(valid.sum())
        grad = torch.zeros_like(student) if need_grad else None
        gflat = grad.view(B * T, V) if need_grad else None
        topk = isinstance(teacher, TopKLogits)
        if loss.alpha > 0:
            if topk:
                t_vals = teacher.values.reshape(B * T, -1)
                t_idx = teacher.indices.reshape(B * T, -1)
            else:
                t_flat = teacher.reshape(B * T, V)
        temp, alpha = loss.temperature, loss.alpha
        kd_sum = torch.zeros((), dtype=torch.float64)
        ce_sum = torch.zeros((), dtype=torch.float64)
        chunk = loss.chunk_size or B * T
        for start in range(0, B * T, chunk):
            stop = min(start + chunk, B * T)
            w = valid[start:stop]  # (c,) positions that count
            if not bool(w.any()):
                continue
            w = w.to(cdtype)
            z = flat[start:stop].to(cdtype)  # (c, V), a view when already float32
            g = None
            if alpha > 0:
                s = z / temp
                if topk:
                    idx = t_idx[start:stop].long()  # (c, k)
                    logq = torch.log_softmax(t_vals[start:stop].to(cdtype) / temp, -1)  # (c, k)
                    kind = loss.kind
                    if kind == "jsd" and loss.beta == 0.0:
                        kind = "forward_kl"
                    if kind == "forward_kl":  # truncated teacher vs the full student distribution
                        logp = torch.log_softmax(s, -1)
                        del s
                        q = logq.exp()
                        d = (q * (logq - logp.gather(-1, idx))).sum(-1)
                        if need_grad:
                            g = logp.exp_().scatter_add_(-1, idx, -q)  # p - q, in place
                    else:  # both on the top-k support (the student renormalised there)
                        logp = torch.log_softmax(s.gather(-1, idx), -1)
                        d, gk = _divergence(kind, loss.beta, logp, logq, need_grad)
                        if need_grad:
                            g = s.zero_().scatter_(-1, idx, gk)
                else:
                    logp = torch.log_softmax(s, -1)
                    del s
                    logq = torch.log_softmax(t_flat[start:stop].to(cdtype) / temp, -1)
                    d, g = _divergence(loss.kind, loss.beta, logp, logq, need_grad)
                kd_sum += (d * w).double().sum()
                if need_grad:  # d(alpha T² D)/dz = alpha T dD/ds, with s = z / T
                    g.mul_((w * (alpha * temp / n))[:, None])
            if lab is not None:
                y = lab[start:stop].clamp_min(0)[:, None]  # (c, 1); ignored rows have weight 0
                logp1 = torch.log_softmax(z, -1)  # (c, V)
                ce_sum -= (logp1.gather(-1, y)[:, 0] * w).double().sum()
                if need_grad and alpha < 1:
                    c = (w * ((1 - alpha) / n))[:, None]  # (c, 1)
                    gce = logp1.exp_().mul_(c).scatter_add_(-1, y, -c)
                    g = gce if g is None else g.add_(gce)
            if need_grad and g is not None:
                gflat[start:stop].copy_(g)
        kd = kd_sum / max(n, 1)
        ce = ce_sum / max(n, 1)
        stats[0], stats[1] = kd, ce if labels is not None else float("nan")
        total = alpha * temp ** 2 * kd + ((1 - alpha) * ce if alpha < 1 else 0.0)
        if need_grad:
            ctx.save_for_backward(grad)
        return torch.as_tensor(total, dtype=cdtype, device=student.device)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad_out.item() != 1.0:
            grad = grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None


def divergence_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 1.0, kind: str = "forward_kl",
                         beta: float = 0.5) -> torch.Tensor:
    """Plain (unchunked, autograd) per-position divergence, shape (..., ): the textbook formulas."""
    logp = torch.log_softmax(student_logits / temperature, -1)
    logq = torch.log_softmax(teacher_logits / temperature, -1)
    return _divergence(kind, beta, logp, logq, need_grad=False)[0]


# --------------------------------------------------------------------------- cached top-k teacher


@dataclass
class TeacherCache:
    """Token windows with their teacher's top-k logits, ready for offline distillation."""

    windows: torch.Tensor  # (N, T) token ids
    values: torch.Tensor  # (N, T, k) float16 teacher logits (temperature 1), descending
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

    def nbytes(self) -> int:
        """Bytes taken by the cached logits (values, indices and mass; windows excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.mass))

    def full_vocab_nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the same windows would take as full-vocabulary logits."""
        n, T = self.windows.shape
        return n * T * int(self.meta["vocab_size"]) * torch.empty((), dtype=dtype).element_size()

    def save(self, path: str | Path) -> Path:
        """Write the cache as one safetensors file, atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"windows": self.windows.contiguous(), "values": self.values.contiguous(),
                   "indices": self.indices.contiguous(), "mass": self.mass.contiguous()}
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-dl-{os.getpid()}-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in self.meta.items()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        """Read a cache written by ``save``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in ("windows", "values", "indices", "mass")}
        for key in ("k", "vocab_size"):
            if key in meta:
                meta[key] = int(meta[key])
        return cls(meta=meta, **tensors)


def _autocast(device: torch.device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_bf16(enabled, device))


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
    device = next(teacher.parameters()).device
    bf16 = resolve_bf16(bf16, device)  # the cache records what really ran
    was_training = teacher.training
    teacher.eval()
    values, indices, mass = [], [], []
    for batch in tqdm(windows.split(batch_size), desc=f"teacher top-{k}", leave=False,
                      disable=not progress):
        with _autocast(device, bf16):
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


def shift_labels(input_ids: torch.Tensor, pad_token_id: int | None = None) -> torch.Tensor:
    """Next-token labels aligned with the logits: ``labels[:, t] = ids[:, t + 1]``, the last (and pads) -100."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if pad_token_id is not None:
        labels[:, :-1][input_ids[:, 1:] == pad_token_id] = IGNORE_INDEX
    return labels


@torch.no_grad()
def topk_fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  ks, loss: DistillationLoss) -> list[dict]:
    """For each k: bytes per token, teacher mass kept (at the loss's T), and the distillation term
    computed from top-k vs from the full teacher (absolute and relative error)."""
    V = teacher_logits.shape[-1]
    full_loss = DistillationLoss(loss.temperature, 1.0, loss.kind, loss.beta, loss.chunk_size)
    _, parts = full_loss(student_logits, teacher_logits, labels, return_parts=True)
    full = parts["kd"]
    valid = labels != IGNORE_INDEX
    logq_T = torch.log_softmax(teacher_logits.float() / loss.temperature, -1)  # (B, T, V)
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


@torch.no_grad()
def distillation_view(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: int,
                      tokenizer, temperature: float, alpha: float, k: int = 8) -> dict:
    """One position, seen by the loss: teacher and student softened at ``T`` on the teacher's top-``k``
    tokens, and the weighted terms ``alpha · T² · KL`` and ``(1 − alpha) · CE`` (logits are (V,))."""
    loss = DistillationLoss(temperature, alpha, "forward_kl")
    _, parts = loss(student_logits[None, None].float(), teacher_logits[None, None].float(),
                    torch.tensor([[target]]), return_parts=True)
    q = torch.softmax(teacher_logits.float() / temperature, -1)  # (V,)
    p = torch.softmax(student_logits.float() / temperature, -1)
    top = q.topk(k).indices
    entropy = float(-(q * q.clamp_min(1e-30).log2()).sum())
    return {"temperature": temperature, "alpha": alpha,
            "tokens": [tokenizer.decode([i]) for i in top.tolist()],
            "teacher_probs": q[top].tolist(), "student_probs": p[top].tolist(),
            "target": tokenizer.decode([target]), "teacher_entropy_bits": entropy,
            "kl": parts["kd"], "ce": parts["ce"], "kd_term": alpha * temperature ** 2 * parts["kd"],
            "ce_term": (1 - alpha) * parts["ce"],
            "total": alpha * temperature ** 2 * parts["kd"] + (1 - alpha) * parts["ce"]}


# --------------------------------------------------------------------------- hidden-state loss


class HiddenStateLoss(nn.Module):
    """DistilBERT-style hidden-state alignment: cosine (``1 − cos``) or MSE between chosen layers.

    ``layers`` pairs ``(student_index, teacher_index)`` into ``output_hidden_states`` (0 = the
    embeddings, i = after block i). A learned linear projection maps the student's width onto the
    teacher's when they differ. The result is averaged over layer pairs and kept positions.
    """

    def __init__(self, student_width: int, teacher_width: int, layers: list[tuple[int, int]],
                 kind: str = "cosine", weight: float = 1.0):
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"kind={kind!r}; allowed: 'cosine', 'mse'")
        _check_range("weight", weight, 0.0, math.inf)
        if not layers:
            raise ValueError("layers=[]; allowed: a non-empty list of (student_index, teacher_index)")
        self.kind = kind  # "cosine" | "mse"
        self.weight = float(weight)  # multiplies the hidden loss before it joins the total
        self.layers = [(int(s), int(t)) for s, t in layers]
        self.proj = (nn.Linear(student_width, teacher_width, bias=False)
                     if student_width != teacher_width else nn.Identity())

    @staticmethod
    def last_layers(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
        """The default pairing: the student's last hidden state with the teacher's."""
        return [(student.config.num_hidden_layers, teacher.config.num_hidden_layers)]

    def forward(self, student_hidden, teacher_hidden, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss between tuples of hidden states ``(B, T, H_s)`` and ``(B, T, H_t)``."""
        total = 0.0
        for s_i, t_i in self.layers:
            hs = self.proj(student_hidden[s_i].float())  # (B, T, H_t)
            ht = teacher_hidden[t_i].float()
            if self.kind == "cosine":
                per = 1 - F.cosine_similarity(hs, ht, dim=-1)  # (B, T)
            else:
                per = (hs - ht).pow(2).mean(-1)
            total = total + (per[mask].mean() if mask is not None else per.mean())
        return total / len(self.layers)


# --------------------------------------------------------------------------- sequence-level KD


@dataclass
class SequenceData:
    """Teacher-generated sequences for sequence-level KD: ids, labels (prompt and padding -100), texts."""

    input_ids: torch.Tensor  # (N, L) prompt + continuation, right-padded
    labels: torch.Tensor  # (N, L) aligned next-token labels; -100 on prompt and padding
    texts: list[str]  # the generated continuations, decoded

    def __len__(self) -> int:
        return len(self.input_ids)


@torch.no_grad()
def generate_distillation_data(teacher: nn.Module, tokenizer, prompts: list[str],
                               max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                               chat: bool = False, progress: bool = True) -> SequenceData:
    """Let the teacher answer each prompt and return the token sequences for a student to learn from.

    Labels cover only the teacher's continuation (the prompt and padding are -100), so a student
    trained with ``DistillationLoss(alpha=0)`` imitates the teacher's outputs (Kim & Rush, 2016).
    """
    if not prompts:
        raise ValueError("prompts=[]; allowed: a non-empty list of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; allowed: an int >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; allowed: >= 0 (0 means greedy)")
    device = next(teacher.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, prompt_lens, texts = [], [], []
    for j, prompt in enumerate(tqdm(prompts, desc="teacher generations", leave=False,
                                    disable=not progress)):
        text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True) if chat else prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        torch.manual_seed(seed + j)
        kwargs = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                  else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
        out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=pad, **kwargs)[0].cpu()
        seqs.append(out)
        prompt_lens.append(ids.shape[1])
        texts.append(tokenizer.decode(out[ids.shape[1]:], skip_special_tokens=True))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[r, :len(s)] = s
        labels[r, p - 1:len(s) - 1] = s[p:]  # logits at t predict token t + 1
    return SequenceData(input_ids, labels, texts)


# --------------------------------------------------------------------------- the trainer


@dataclass
class TrainConfig:
    """How a distillation run trains; every field is checked in ``__post_init__``."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # windows per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 10  # linear warm-up steps, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping
    bf16: bool | str = False  # bf16 autocast for the student's forward (fp32 master weights); 'auto': if faster here
    teacher_bf16: bool | str = "auto"  # bf16 autocast for a live teacher: True, False or 'auto' (measured here)
    eval_every: int = 0  # validation perplexity every N steps (and at 0 and the end); 0 = start and end
    eval_batch_size: int = 8  # windows per forward pass during evaluation
    checkpoint_dir: str | None = None  # where checkpoint.pt is written (atomically)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none
    seed: int = 0  # seeds data order, init of new modules and torch's RNG
    progress: bool = True  # show a tqdm.auto progress bar

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r}; allowed: an int >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r}; allowed: an int >= 0")
        check_bf16(self.bf16, "TrainConfig", "bf16")
        check_bf16(self.teacher_bf16, "TrainConfig", "teacher_bf16")
        _check_range("TrainConfig.lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("TrainConfig.weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("TrainConfig.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("TrainConfig.max_grad_norm", self.max_grad_norm, 0.0, math.inf)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs checkpoint_dir")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distributed_context() -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA); return (rank, world)."""
    import torch.distributed as dist

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
    (offline top-k distillation) or a ``SequenceData`` (sequence-level KD). The data order is a
    seeded permutation per epoch, derived from the step number alone, so a resumed run sees exactly
    the batches the uninterrupted run would. Under ``torchrun`` the student is wrapped in DDP and
    each process takes its own slice of every global batch.
    """

    def __init__(self, student: nn.Module, train, *, teacher: nn.Module | None = None,
                 loss: DistillationLoss | None = None, config: TrainConfig | None = None,
                 val_windows: torch.Tensor | None = None, hidden: HiddenStateLoss | None = None,
                 callbacks=()):
        self.config = config or TrainConfig()
        self.loss = loss or DistillationLoss()
        self.teacher = teacher
        self.val_windows = val_windows
        self.callbacks = list(callbacks)  # each called as fn(trainer, step, row) after a step
        self.cache = train if isinstance(train, TeacherCache) else None
        if isinstance(train, SequenceData):
            self.inputs, self.labels = train.input_ids, train.labels
        elif isinstance(train, TeacherCache):
            self.inputs, self.labels = train.windows, None
        elif isinstance(train, torch.Tensor) and train.dim() == 2:
            self.inputs, self.labels = train, None
        else:
            raise ValueError("train: allowed a (N, T) tensor of windows, a TeacherCache or a SequenceData")
        if self.loss.needs_teacher and teacher is None and self.cache is None:
            raise ValueError(f"loss alpha={self.loss.alpha} needs a teacher or a TeacherCache; "
                             f"use alpha=0 to train on labels alone")
        if hidden is not None and teacher is None:
            raise ValueError("hidden-state loss needs a live teacher (teacher=...)")
        if teacher is not None:
            from .models import check_vocab_compatible

            check_vocab_compatible(teacher, student)
            teacher.eval().requires_grad_(False)
        self.rank, self.world = distributed_context()
        per_step = self.config.batch_size * self.config.grad_accum * self.world
        if per_step > len(self.inputs):
            raise ValueError(f"batch_size·grad_accum·world = {per_step} windows per step, but only "
                             f"{len(self.inputs)} training windows; allowed: at most {len(self.inputs)}")
        self.device = next(student.parameters()).device
        self.student = student
        torch.manual_seed(self.config.seed)
        if hidden is not None:
            hidden.to(self.device)
        self.module = _Trainable(student, hidden)
        self.model = self.module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.module, device_ids=ids)
        cfg = self.config
        decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.module.named_parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        try:  # the fused kernel is one pass over the weights: ~8x faster than the loop on a CPU
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.history: dict[str, list[dict]] = {"train": [], "eval": []}

    # -- data
    def _batch_rows(self, step: int, micro: int) -> torch.Tensor:
        """Row indices of this process's micro-batch: a seeded per-epoch permutation, by position."""
        cfg, n = self.config, len(self.inputs)
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
    def _micro_step(self, rows: torch.Tensor, scale: float) -> dict:
        cfg = self.config
        ids = self.inputs[rows].to(self.device)  # (b, T)
        labels = (self.labels[rows].to(self.device) if self.labels is not None
                  else shift_labels(ids))
        teacher_out, t_hidden = None, None
        if self.loss.needs_teacher or self.module.hidden is not None:
            if self.cache is not None:
                teacher_out = self.cache.topk(rows).to(self.device)
            else:
                with torch.no_grad(), _autocast(self.device, cfg.teacher_bf16):
                    out = self.teacher(ids, output_hidden_states=self.module.hidden is not None)
                teacher_out = out.logits
                t_hidden = out.hidden_states
        with _autocast(self.device, cfg.bf16):
            out = self.model(ids)
        loss, parts = self.loss(out.logits, teacher_out if self.loss.needs_teacher else None, labels,
                                return_parts=True)
        if self.module.hidden is not None:
            h = self.module.hidden(out.hidden_states, t_hidden, labels != IGNORE_INDEX)
            parts["hidden"] = float(h.detach())
            loss = loss + self.module.hidden.weight * h
        (loss * scale).backward()
        parts["loss"] = float(loss.detach())
        parts["tokens"] = int((labels != IGNORE_INDEX).sum())
        return parts

    def train_step(self) -> dict:
        """Run one optimizer step (with accumulation and clipping) and return its history row."""
        cfg = self.config
        self.module.train()
        start = time.perf_counter()
        rows_parts = []
        for micro in range(cfg.grad_accum):
            rows = self._batch_rows(self.step, micro)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            ctx = self.model.no_sync() if not sync else _null()
            with ctx:
                rows_parts.append(self._micro_step(rows, 1.0 / cfg.grad_accum))
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
               "seconds": time.perf_counter() - start,
               "tokens": sum(p["tokens"] for p in rows_parts) * self.world}
        for key in rows_parts[0]:
            if key != "tokens":
                row[key] = sum(p[key] for p in rows_parts) / len(rows_parts)
        if self.world > 1:  # report the mean over processes
            import torch.distributed as dist

            keys = [k for k in ("loss", "kd", "ce", "hidden") if k in row]
            t = torch.tensor([row[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            row.update({k: float(v) / self.world for k, v in zip(keys, t)})
        self.history["train"].append(row)
        return row

    def evaluate(self) -> float:
        """Validation perplexity of the student (identical on every process)."""
        from .evaluate import perplexity

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
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {"step": self.step, "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": _rng_state(), "history": self.history, "config": asdict(self.config)}
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
            os.close(fd)
            try:
                torch.save(state, tmp)
                os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if self.world > 1:
            import torch.distributed as dist

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
        self.step = int(state["step"])
        self.history = state["history"]
        return True

    # -- the loop
    def train(self, resume: bool = False) -> dict[str, list[dict]]:
        """Train to ``config.steps`` (continuing from the checkpoint when ``resume``); return the history."""
        cfg = self.config
        if not (resume and self.load_checkpoint()):
            torch.manual_seed(cfg.seed)
        if self.val_windows is not None and self.step == 0 and not self.history["eval"]:
            self.evaluate()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train ({self._mode()})",
                   disable=not cfg.progress or self.rank != 0, leave=False)
        while self.step < cfg.steps:
            row = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            last = self.step == cfg.steps
            if self.val_windows is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                                 or last):
                row["val_ppl"] = self.evaluate()
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last):
                self.save_checkpoint()
            for fn in self.callbacks:
                fn(self, self.step, row)
        bar.close()
        return self.history

    def _mode(self) -> str:
        if not self.loss.needs_teacher:
            return "CE only"
        source = f"cached top-{self.cache.k}" if self.cache is not None else "live teacher"
        return f"{self.loss.kind}, {source}"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def final_val_ppl(history: dict) -> float:
    """The last validation perplexity of a run's history."""
    return history["eval"][-1]["val_ppl"]
