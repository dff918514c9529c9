"""Algorithm lab of notebook 01: one on-policy distillation (GKD) step, written by the learner.

GKD (Agarwal et al., 2024, arXiv:2306.13649) lets the student write its own continuation, asks the
teacher what it would predict at every token the student wrote, and lowers a divergence between the
two on exactly those positions. Its divergence is the generalized Jensen-Shannon divergence

    JSD_β(q ‖ p) = β · KL(q ‖ m) + (1 − β) · KL(p ‖ m),   m = β · q + (1 − β) · p

(q the teacher's distribution, p the student's), which moves from the forward KL (β → 0, after dividing
by β) to the reverse KL (β → 1). The learner writes

* ``generalized_jsd(student_logits, teacher_logits, beta) -> (N,)``: per-position divergence, for 0 < β < 1;
* ``gkd_step(student, teacher, prompts, gen_tokens, beta, optimizer, generator) -> (ids, loss)``: sample
  ``gen_tokens`` tokens from the student (no gradients, the seeded ``generator``), score prompt +
  continuation with the teacher (no gradients) and the student (with), average ``generalized_jsd`` over
  the *generated* positions only, and take one optimizer step.

:func:`check_generalized_jsd` checks the divergence against ``distillation.losses``; :func:`check_gkd_step`
runs the learner's step on a copy of a tiny student and checks the returned loss and the update against
the package's loss on the same sampled tokens; :func:`gkd_lab` runs a few steps on the real student.
"""

from __future__ import annotations

import copy
import math

import torch

from ._check import allclose, check, not_attempted, yours_or_reference
from ._package import DistillationLoss, generated_labels, on_policy_divergence, sample_continuations, tiny_llama

__all__ = ["check_generalized_jsd", "check_gkd_step", "generalized_jsd_reference", "gkd_lab", "gkd_step_reference"]


def generalized_jsd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              beta: float) -> torch.Tensor:
    """Per-row generalized JSD of (N, V) logits at ``0 < beta < 1`` (``distillation.losses``' formula)."""
    logp = torch.log_softmax(student_logits.double(), -1)
    logq = torch.log_softmax(teacher_logits.double(), -1)
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))  # log(β q + (1 − β) p)
    kl_q = (logq.exp() * (logq - logm)).sum(-1)
    kl_p = (logp.exp() * (logp - logm)).sum(-1)
    return beta * kl_q + (1 - beta) * kl_p


def _jsd_variant(swap_weights=False, mix_logits=False, forward_only=False):
    def wrong(s, t, beta):
        logp, logq = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
        if forward_only:
            return (logq.exp() * (logq - logp)).sum(-1)
        b = 1 - beta if swap_weights else beta
        if mix_logits:
            logm = torch.log_softmax(b * t.double() + (1 - b) * s.double(), -1)
        else:
            logm = torch.logaddexp(logq + math.log(b), logp + math.log1p(-b))
        return beta * (logq.exp() * (logq - logm)).sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    return wrong


_JSD_MISTAKES = [
    ("the mixture's weights are swapped: m = β · q_teacher + (1 − β) · p_student", _jsd_variant(swap_weights=True)),
    ("the mixture of the logits: m mixes the two *probability distributions*, log m = "
     "logaddexp(log q + log β, log p + log(1 − β))", _jsd_variant(mix_logits=True)),
    ("the forward KL: GKD's divergence compares both distributions with their mixture m", _jsd_variant(
        forward_only=True)),
]


def check_generalized_jsd(fn, logits=None) -> bool:
    """Check ``fn(student_logits, teacher_logits, beta) -> (N,)``; ``logits``: (student, teacher) of the lesson."""
    g = torch.Generator().manual_seed(15)
    cases = [(torch.randn(n, v, generator=g) * s, torch.randn(n, v, generator=g) * s, b)
             for n, v, s, b in ((1, 5, 1.0, 0.5), (4, 30, 3.0, 0.1), (8, 100, 5.0, 0.9), (3, 10, 2.0, 0.3))]
    labels = [None] * len(cases)
    if logits is not None:
        student, teacher = (x.detach().float().cpu().reshape(-1, x.shape[-1]) for x in logits)
        cases.append((student, teacher, 0.5))
        labels.append(f"the teacher's and the student's logits {tuple(teacher.shape)}, beta 0.5")
    return check("generalized JSD", fn, generalized_jsd_reference, cases, atol=1e-6, rtol=1e-5, labels=labels,
                 mistakes=_JSD_MISTAKES)


def _package_loss(student, teacher, ids, prompt_tokens, beta) -> torch.Tensor:
    """The package's GKD loss of ``student`` on ``ids``: the JSD over the generated positions (a graph to differentiate)."""
    loss = DistillationLoss(kd_temperature=1.0, alpha=1.0, kind="jsd", beta=beta)
    with torch.no_grad():
        t_logits = teacher(ids).logits.float()
    return loss(student(ids).logits.float(), t_logits, generated_labels(ids, prompt_tokens))


def gkd_step_reference(student, teacher, prompts, gen_tokens, beta, optimizer, generator):
    """One GKD step with the package's sampler and loss: ``(ids, loss value)``."""
    ids = sample_continuations(student, prompts, gen_tokens, 1.0, generator)  # (B, P + G)
    student.train()
    loss = _package_loss(student, teacher, ids, prompts.shape[1], beta)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return ids, float(loss.detach())


def check_gkd_step(fn, student=None, teacher=None, prompts: torch.Tensor | None = None, gen_tokens: int = 4,
                   beta: float = 0.5, lr: float = 1e-2) -> bool:
    """Run the learner's ``gkd_step`` once on a copy of ``student`` (SGD, ``lr``) and check it.

    The sampled ids must extend the prompts by ``gen_tokens`` tokens; the returned loss must equal the
    package's GKD loss on those ids (generated positions only); and the update must equal one SGD step
    on that loss. ``student`` itself is not changed. By default two tiny random Llamas and two 5-token prompts
    (a step on them takes milliseconds).
    """
    student = tiny_llama(seed=1) if student is None else student
    teacher = tiny_llama(seed=2) if teacher is None else teacher
    if prompts is None:
        prompts = torch.randint(0, student.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    mine = copy.deepcopy(student)
    opt = torch.optim.SGD(mine.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    try:
        ids, loss = fn(mine, teacher, prompts.clone(), gen_tokens, beta, opt, gen)
    except NotImplementedError:
        return not_attempted("one GKD step")
    ids = torch.as_tensor(ids)
    b, p = prompts.shape
    if tuple(ids.shape) != (b, p + gen_tokens) or not torch.equal(ids[:, :p], prompts):
        raise AssertionError(f"one GKD step: ids of shape {tuple(ids.shape)} should be the prompts {tuple(prompts.shape)} "
                             f"followed by {gen_tokens} sampled tokens, shape {(b, p + gen_tokens)}")
    want = copy.deepcopy(student)
    want.train()
    ref = _package_loss(want, teacher, ids, p, beta)
    problem = allclose(float(loss), float(ref.detach()), 1e-5, 1e-4)
    if problem:
        every = DistillationLoss(kd_temperature=1.0, alpha=1.0, kind="jsd", beta=beta)
        with torch.no_grad():
            s, t = want(ids).logits.float(), teacher(ids).logits.float()
            all_positions = float(every(s, t))
        hint = ("\n  likely mistake: the prompt's positions are in the loss: average over the generated positions "
                "only (the logits at positions P - 1 … P + G - 2 predict the generated tokens)"
                if allclose(float(loss), all_positions, 1e-5, 1e-4) is None else "")
        raise AssertionError(f"one GKD step: the loss {float(loss):.6g} is not the package's GKD loss on the same "
                             f"tokens, {float(ref.detach()):.6g}{hint}")
    torch.optim.SGD(want.parameters(), lr=lr).zero_grad()
    ref.backward()
    with torch.no_grad():
        for (name, got), start in zip(mine.named_parameters(), want.parameters()):
            expected = start - lr * (start.grad if start.grad is not None else torch.zeros_like(start))
            if allclose(got, expected, 1e-6, 1e-4):
                raise AssertionError(f"one GKD step: the update of {name} is not one step down the loss's gradient"
                                     "\n  likely mistake: call optimizer.zero_grad(), loss.backward() and "
                                     "optimizer.step() once, on the loss of the generated positions")
    print(f"one GKD step: correct: {gen_tokens} tokens sampled per prompt, the loss of the generated positions "
          f"({float(loss):.4f}), and the update it implies.")
    return True


def gkd_lab(student, teacher, prompts: torch.Tensor, gkd_step, steps: int, gen_tokens: int, beta: float = 0.5,
            lr: float = 3e-5, seed: int = 0, eval_prompts: torch.Tensor | None = None) -> dict:
    """A few GKD steps on ``student`` (changed in place) with the learner's step, Adam at ``lr``.

    Returns ``{"losses", "before", "after", "by"}``: each step's loss and the student's on-policy
    divergence to the teacher on ``eval_prompts`` (default ``prompts``) before and after.
    """
    step = yours_or_reference(gkd_step, gkd_step_reference, "my_gkd_step")
    eval_prompts = prompts if eval_prompts is None else eval_prompts
    loss_fn = DistillationLoss(kd_temperature=1.0, alpha=1.0, kind="jsd", beta=beta)

    def divergence():
        return on_policy_divergence(student, teacher, eval_prompts, gen_tokens, loss=loss_fn, seed=seed)

    before = divergence()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    gen = torch.Generator(device=prompts.device).manual_seed(seed)
    losses = [float(step(student, teacher, prompts, gen_tokens, beta, opt, gen)[1]) for _ in range(steps)]
    return {"losses": losses, "before": before, "after": divergence(), "by": step.label}
