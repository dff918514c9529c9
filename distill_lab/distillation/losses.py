"""The one divergence of the package: distillation losses with a temperature, top-k teachers, hidden states.

* Soft targets at a temperature (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
  Neural Network", arXiv:1503.02531): ``alpha · T² · KL(p_teacher^T ‖ p_student^T) + (1 − alpha) · CE``.
* Reverse KL ``KL(p_student ‖ p_teacher)``, mode-seeking (Gu et al., 2024, "MiniLLM",
  arXiv:2306.08543), and the generalized Jensen-Shannon divergence with a ``beta`` (Agarwal et al.,
  2024, "On-Policy Distillation of Language Models" (GKD), arXiv:2306.13649).
* A hidden-state loss (cosine or MSE, with a projection when widths differ) as in DistilBERT
  (Sanh et al., 2019, arXiv:1910.01108).
* Offline distillation from cached top-k teacher logits (as in sparse / "top-k" KD): ``TopKLogits``.

The loss computes its gradient in the forward pass, chunk by chunk over tokens, so that beyond the
logits themselves it keeps exactly one extra ``(B, T, V)`` tensor (the gradient) plus
``(chunk_size, V)`` temporaries: a 49k vocabulary fits on a laptop. Every KL in the package
(distillation, healing a pruned model, QAT, ``pruning.kl_to_teacher``, the lesson's ``distillation_view``)
is this one, and every KL in it is ``kl_divergence``.

Two temperatures, two names. ``kd_temperature`` is the *softening* temperature of the divergence
(both distributions at ``softmax(logits / T)``, the loss scaled by T²). Its default, ``KD_TEMPERATURE = 1``,
is the one every lesson, recipe, healing and QAT run uses: at T = 1 the loss compares the very
distributions the course evaluates (perplexity, KL to the teacher), as in Minitron and GKD; Hinton's
T > 1 is a knob to turn, not the default. ``sampling_temperature`` (``on_policy``, ``TrainConfig``,
``data.generate_distillation_data``) is how the student or teacher *samples* tokens; it never enters a
divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "KD_TEMPERATURE", "KINDS", "DistillationLoss", "HiddenStateLoss", "TopKLogits",
           "divergence_reference", "kl_divergence", "soft_target_loss"]

IGNORE_INDEX = -100
KINDS = ("forward_kl", "reverse_kl", "jsd")
KD_TEMPERATURE = 1.0  # the one default softening temperature (see the module docstring)


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

    values: torch.Tensor  # (B, T, k) float, teacher logits at kd_temperature 1, descending
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
    forward KL and JSD/(1 − beta) to the reverse KL). ``T`` is ``kd_temperature`` (the softening
    temperature, default ``KD_TEMPERATURE``); the CE term uses T = 1.

    ``labels`` are aligned with the logits (``labels[b, t]`` is the target of ``logits[b, t]``, so a
    causal LM passes its inputs shifted left by one); positions labelled -100 (padding, prompts, the
    last position) count in neither term. "batchmean over tokens": both terms are sums over the
    kept positions divided by their number.
    """

    def __init__(self, kd_temperature: float = KD_TEMPERATURE, alpha: float = 0.5, kind: str = "forward_kl",
                 beta: float = 0.5, chunk_size: int | None = 128):
        super().__init__()
        _check_range("kd_temperature", kd_temperature, 0.0, math.inf, low_open=True)
        _check_range("alpha", alpha, 0.0, 1.0)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; allowed: {', '.join(repr(k) for k in KINDS)}")
        _check_range("beta", beta, 0.0, 1.0)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r}; allowed: a positive int (tokens per chunk) or None")
        self.kd_temperature = float(kd_temperature)  # softening temperature T > 0
        self.alpha = float(alpha)  # weight of the distillation term, in [0, 1]
        self.kind = kind  # "forward_kl" | "reverse_kl" | "jsd"
        self.beta = float(beta)  # JSD interpolation in [0, 1] (only for kind="jsd")
        self.chunk_size = chunk_size  # tokens per chunk; None = all at once

    def extra_repr(self) -> str:
        return (f"kd_temperature={self.kd_temperature}, alpha={self.alpha}, kind={self.kind!r}, "
                f"beta={self.beta}, chunk_size={self.chunk_size}")

    @property
    def needs_teacher(self) -> bool:
        """True when the loss has a distillation term (alpha > 0)."""
        return self.alpha > 0

    def weighted_terms(self, parts: dict) -> dict:
        """The two terms of the total from ``return_parts``'s ``{"kd", "ce"}``: ``alpha · T² · kd``, ``(1 − alpha) · ce``."""
        kd_term = self.alpha * self.kd_temperature ** 2 * parts["kd"]
        ce_term = (1 - self.alpha) * parts["ce"]
        return {"kd_term": kd_term, "ce_term": ce_term, "total": kd_term + ce_term}

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


def kl_divergence(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a ‖ b) = Σ a · (log a − log b)`` over the last dimension, from ``a``'s probabilities and both log-probs.

    The package's one KL: forward KL is ``kl_divergence(q, log q, log p)`` (teacher q, student p), reverse
    KL ``kl_divergence(p, log p, log q)``, and the generalized JSD a mix of two of them.
    """
    return (a * (log_a - log_b)).sum(-1)


def _divergence(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence ``D(q, p)`` for student log-probs ``logp`` and teacher ``logq`` (c, V'),
    and its gradient with respect to the student's (temperature-scaled) logits, shape (c, V')."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        q = logq.exp()
        d = kl_divergence(q, logq, logp)  # (c,)
        return d, (logp.exp() - q if need_grad else None)
    p = logp.exp()  # (c, V')
    if kind == "reverse_kl":
        d = kl_divergence(p, logp, logq)
        return d, (p * (logp - logq - d[:, None]) if need_grad else None)
    # generalized JSD: m = beta q + (1 - beta) p; dD/dp_i = (1 - beta)(log p_i - log m_i)
    q = logq.exp()
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    d = beta * kl_divergence(q, logq, logm) + (1 - beta) * kl_divergence(p, logp, logm)
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
        temp, alpha = loss.kd_temperature, loss.alpha
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
                        d = kl_divergence(q, logq, logp.gather(-1, idx))
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
                         kd_temperature: float = KD_TEMPERATURE, kind: str = "forward_kl",
                         beta: float = 0.5) -> torch.Tensor:
    """Plain (unchunked, autograd) per-position divergence, shape (..., ): the textbook formulas."""
    logp = torch.log_softmax(student_logits / kd_temperature, -1)
    logq = torch.log_softmax(teacher_logits / kd_temperature, -1)
    return _divergence(kind, beta, logp, logq, need_grad=False)[0]


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     kd_temperature: float = KD_TEMPERATURE, kind: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """``T² · D(p_teacher^T, p_student^T)`` averaged over every position of ``(..., V)`` logits, by autograd.

    The unchunked form of ``DistillationLoss(kd_temperature, alpha=1, kind, beta)`` without labels: the same
    formulas (``divergence_reference``), with autograd's gradient and a few ``(..., V)`` temporaries.
    The healing loop of ``pruning.heal(use_trainer=False)`` uses it; QAT's tests measure with it.
    """
    return (divergence_reference(student_logits, teacher_logits, kd_temperature, kind, beta).mean()
            * kd_temperature ** 2)


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
