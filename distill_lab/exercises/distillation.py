"""Lab of notebook 01 (distillation): the KD loss, reverse KL, a top-k teacher, and one training step.

The learner writes the loss and the training step; :func:`train_with` trains a real student of the
teacher with them for a few steps, and the lesson compares that loss curve with the same loop run
on the package's ``DistillationLoss`` (same student, same data, same seed).
"""

from __future__ import annotations

import torch

from ..runtime import device_of
from ._check import allclose, check, label_of, yours_or_reference
from ._package import KD_TEMPERATURE, DistillationLoss, TopKLogits, set_seed, tiny_llama

__all__ = ["check_kd_loss", "check_reverse_kl", "check_topk_teacher", "check_train_step", "curves_agree",
           "kd_loss_reference", "reference_train_step", "train_with"]


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T² · mean_rows KL(q_T ‖ p_T)`` for (N, V) logits, by ``DistillationLoss(alpha=1)``."""
    loss = DistillationLoss(temperature, alpha=1.0, kind="forward_kl")
    return loss(student_logits[None], teacher_logits[None])


def _reverse_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    loss = DistillationLoss(temperature, alpha=1.0, kind="reverse_kl")
    return loss(student_logits[None].double(), teacher_logits[None].double()) / temperature ** 2


def _topk_reference(values: torch.Tensor, indices: torch.Tensor, vocab_size: int,
                    temperature: float) -> torch.Tensor:
    q = torch.softmax(values.double() / temperature, -1)
    return torch.zeros(*values.shape[:-1], vocab_size, dtype=torch.float64).scatter_(-1, indices, q)


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) per row, from log-probabilities."""
    return (logq.exp() * (logq - logp)).sum(-1)


def _kd(s, t, temp, *, swap=False, student_t=True, teacher_t=True, square=True, reduce="rows"):
    logp = torch.log_softmax(s.double() / (temp if student_t else 1.0), -1)
    logq = torch.log_softmax(t.double() / (temp if teacher_t else 1.0), -1)
    kl = _kl_rows(logq, logp) if swap else _kl_rows(logp, logq)  # swap: KL(p ‖ q)
    value = {"rows": kl.mean(), "sum": kl.sum(), "all": kl.sum() / s.numel()}[reduce]
    return value * (temp ** 2 if square else 1.0)


def _logit_cases(seed: int, logits=None):
    g = torch.Generator().manual_seed(seed)
    cases = [(torch.randn(n, v, generator=g) * s, torch.randn(n, v, generator=g) * s, t)
             for n, v, s, t in ((1, 5, 1.0, 1.0), (4, 30, 3.0, 2.0), (16, 200, 5.0, 4.0), (3, 10, 2.0, 0.5))]
    labels = [None] * len(cases)
    if logits is not None:
        student, teacher = (x.detach().float().cpu() for x in logits)
        cases.append((student, teacher, 2.0))
        labels.append(f"the teacher's and a student's logits {tuple(teacher.shape)}, T=2")
    return cases, labels


_KD_MISTAKES = [
    ("missing T²: multiply the KL by T² so its gradients keep their size when T changes",
     lambda s, t, T: _kd(s, t, T, square=False)),
    ("KL direction swapped: distillation's forward KL is KL(teacher ‖ student) = Σ q·(log q − log p), "
     "weighted by the teacher's probabilities q",
     lambda s, t, T: _kd(s, t, T, swap=True)),
    ("summed over the rows (tokens): take the mean over rows so the loss does not grow with the batch",
     lambda s, t, T: _kd(s, t, T, reduce="sum")),
    ("averaged over the vocabulary too (F.kl_div(..., reduction='mean') divides by N·V): use "
     "reduction='batchmean', the mean over rows",
     lambda s, t, T: _kd(s, t, T, reduce="all")),
    ("only the student is softened: divide the teacher's logits by T as well",
     lambda s, t, T: _kd(s, t, T, teacher_t=False)),
    ("only the teacher is softened: divide the student's logits by T as well",
     lambda s, t, T: _kd(s, t, T, student_t=False)),
]


def check_kd_loss(fn, logits=None) -> bool:
    """Check ``fn(student_logits, teacher_logits, T)`` on (N, V) logits: ``T² · mean_rows KL(q_T ‖ p_T)``.

    ``logits=(student (N, V), teacher (N, V))`` adds a case on real logits.
    """
    cases, labels = _logit_cases(0, logits)
    return check("temperature-scaled KL", fn, lambda s, t, T: kd_loss_reference(s.double(), t.double(), T),
                 cases, atol=1e-5, rtol=1e-4, labels=labels, mistakes=_KD_MISTAKES)


def check_reverse_kl(fn, logits=None) -> bool:
    """Check ``fn(student_logits, teacher_logits, T)``: ``mean_rows KL(p_T ‖ q_T)`` (no T² factor)."""
    cases, labels = _logit_cases(1, logits)
    mistakes = [("the T² factor: this reverse KL is the plain divergence, without T²",
                 lambda s, t, T: _kd(s, t, T, swap=True)),
                ("this is the forward KL(teacher ‖ student): the reverse KL weights by the student's "
                 "probabilities, Σ p·(log p − log q)",
                 lambda s, t, T: _kd(s, t, T, square=False)),
                ("summed over the rows: take the mean", lambda s, t, T: _kd(s, t, T, swap=True, square=False,
                                                                          reduce="sum"))]
    return check("reverse KL", fn, _reverse_reference, cases, atol=1e-5, rtol=1e-4, labels=labels,
                 mistakes=mistakes)


def check_topk_teacher(fn, logits: torch.Tensor | None = None, k: int = 64) -> bool:
    """Check ``fn(values, indices, vocab_size, T)``: the teacher's top-k, renormalised, as a (N, V) distribution.

    ``logits`` (N, V): real teacher logits whose top-``k`` make one more case.
    """
    g = torch.Generator().manual_seed(2)
    cases, labels = [], []
    for n, v, kk, t in ((1, 8, 3, 1.0), (5, 100, 10, 2.0), (4, 50, 50, 0.7)):
        values, indices = (torch.randn(n, v, generator=g) * 4).topk(kk, -1)
        cases.append((values, indices, v, t))
        labels.append(None)
    if logits is not None:
        values, indices = logits.detach().float().cpu().topk(k, -1)
        cases.append((values, indices, logits.shape[-1], 1.0))
        labels.append(f"the teacher's top-{k} logits of {logits.shape[0]} tokens")

    def spread(values, indices, vocab, t, probs):
        return torch.zeros(*values.shape[:-1], vocab, dtype=torch.float64).scatter_(-1, indices, probs.double())

    mistakes = [("temperature ignored: the softmax runs on values / T",
                 lambda v, i, V, t: spread(v, i, V, t, torch.softmax(v.double(), -1))),
                ("raw logits written at the indices: write softmax(values / T), which sums to 1 over the top-k",
                 lambda v, i, V, t: spread(v, i, V, t, v.double() / t)),
                ("normalised over the whole vocabulary (zeros count as logits 0): normalise over the k kept "
                 "values only", lambda v, i, V, t: torch.softmax(
                     torch.zeros(*v.shape[:-1], V, dtype=torch.float64).scatter_(-1, i, v.double() / t), -1))]
    ok = check("top-k teacher distribution", fn, _topk_reference, cases, atol=1e-6, rtol=1e-5, labels=labels,
               mistakes=mistakes)
    if ok:  # and it is the distribution the cached loss uses
        values, indices, v, t = cases[1]
        student = torch.randn(1, values.shape[0], v, generator=g)
        q = torch.as_tensor(fn(values, indices, v, t), dtype=torch.float64)
        mine = (q * (q.clamp_min(1e-300).log() - torch.log_softmax(student[0].double() / t, -1))).sum(-1).mean()
        ours = DistillationLoss(t, 1.0)(student, TopKLogits(values[None], indices[None])) / t ** 2
        assert abs(mine.item() - ours.item()) < 1e-4, "your distribution differs from the one the loss uses"
    return ok


# ------------------------------------------------------------------------------- the training step


def reference_train_step(student, teacher, batch, optimizer, loss_fn, temperature: float) -> float:
    """One distillation step: teacher forward (no gradients), student forward, loss, backward, step."""
    with torch.no_grad():
        teacher_logits = teacher(batch).logits
    student_logits = student(batch).logits
    vocab = student_logits.shape[-1]
    loss = loss_fn(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_variant(order: str, no_grad_teacher: bool = True, swap: bool = False):
    """A wrong training step: ``order`` lists 'z' (zero_grad), 'b' (backward), 's' (step)."""
    def step(student, teacher, batch, optimizer, loss_fn, temperature):
        if no_grad_teacher:
            with torch.no_grad():
                t = teacher(batch).logits
        else:
            t = teacher(batch).logits
        s = student(batch).logits
        v = s.shape[-1]
        pair = (t.reshape(-1, v), s.reshape(-1, v)) if swap else (s.reshape(-1, v), t.reshape(-1, v))
        loss = loss_fn(*pair, temperature)
        for op in order:
            {"z": optimizer.zero_grad, "b": loss.backward, "s": optimizer.step}[op]()
        return loss.item()
    return step


def _run_steps(step_fn, seed: int, steps: int = 3):
    """Train a tiny student for ``steps`` with ``step_fn``; return its losses, final weights and teacher grads."""
    teacher = tiny_llama(seed=100 + seed).double()
    student = tiny_llama(seed=200 + seed).double().train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    # the loss is plain autograd (_kd), so a teacher run with gradients gets them (and the check sees it)
    losses = [step_fn(student, teacher, torch.randint(0, 256, (2, 12), generator=g), optimizer, _kd, 2.0)
              for _ in range(steps)]
    teacher_grads = float(any(p.grad is not None for p in teacher.parameters()))
    weights = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    return torch.cat([torch.tensor([float(x) for x in losses], dtype=torch.float64), weights,
                      torch.tensor([teacher_grads], dtype=torch.float64)])


_STEP_MISTAKES = [
    ("gradients accumulate across steps: call optimizer.zero_grad() every step, before loss.backward()",
     _step_variant("bs")),
    ("the weights never change: call optimizer.step() after loss.backward() (and zero_grad() before "
     "backward, not between backward and step)", _step_variant("zb")),
    ("the teacher ran with gradients: wrap its forward in torch.no_grad() (it must not learn, and its "
     "activations would fill the memory)", _step_variant("zbs", no_grad_teacher=False)),
    ("student and teacher swapped in the loss: loss_fn(student_logits, teacher_logits, T)",
     _step_variant("zbs", swap=True)),
]


def check_train_step(fn) -> bool:
    """Check ``fn(student, teacher, batch, optimizer, loss_fn, T) -> float`` on tiny models (3 steps, 2 seeds).

    Compared: the three losses, the student's weights after them, and whether the teacher got gradients.
    """
    cases = [(0,), (1,)]
    return check("training step", lambda seed: _run_steps(fn, seed),
                 lambda seed: _run_steps(reference_train_step, seed),
                 cases, atol=1e-8, rtol=1e-6, labels=["tiny random models, seed 0", "seed 1"],
                 mistakes=[(hint, (lambda wrong: lambda seed: _run_steps(wrong, seed))(wrong))
                           for hint, wrong in _STEP_MISTAKES])


# ---------------------------------------------------------------------------------------- the lab


def train_with(make_student, teacher, windows: torch.Tensor, train_step, kd_loss, steps: int,
               batch_size: int, lr: float, kd_temperature: float = KD_TEMPERATURE, seed: int = 0) -> dict:
    """Train ``make_student()`` for ``steps`` with the learner's ``train_step`` and ``kd_loss`` (live teacher, fp32).

    Batch ``i`` is ``windows[i·batch_size : (i+1)·batch_size]``; AdamW at a constant ``lr``. Returns
    ``{"losses": [...], "by": "yours" | "reference ..."}``.
    """
    step = yours_or_reference(train_step, reference_train_step, "my_train_step")
    loss = yours_or_reference(kd_loss, kd_loss_reference, "my_kd_loss")
    set_seed(seed)
    student = make_student().train()
    device = device_of(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    losses = [step(student, teacher, windows[i * batch_size:(i + 1) * batch_size].to(device), optimizer, loss,
                   kd_temperature) for i in range(steps)]
    return {"losses": [float(x) for x in losses], "by": label_of(step, loss)}


def curves_agree(mine: list[float], reference: list[float], rtol: float = 1e-3) -> str | None:
    """``None`` when two loss curves agree step by step within ``rtol``; else the first step that differs."""
    return allclose(torch.tensor(mine), torch.tensor(reference), atol=0.0, rtol=rtol)
