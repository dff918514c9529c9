"""distill_lab.distillation.losses: the one divergence against independent float64 formulas, top-k teachers."""

import pytest
import torch
import torch.nn.functional as F

from distill_lab.distillation.losses import DistillationLoss, TopKLogits, divergence_reference, soft_target_loss

from ._helpers import random_case

# ----------------------------------------------------------------- independent float64 reference


def reference_loss(student, teacher, labels, T, alpha, kind="forward_kl", beta=0.5):
    """The formula of the issue, written out in float64 with plain probabilities (no log-space tricks)."""
    s, t = student.double(), teacher.double()
    keep = labels != -100
    p = torch.softmax(s / T, -1)[keep]  # (n, V) student at temperature T
    q = torch.softmax(t / T, -1)[keep]  # (n, V) teacher at temperature T

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        d = kl(q, p)
    elif kind == "reverse_kl":
        d = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        d = beta * kl(q, m) + (1 - beta) * kl(p, m)
    ce = F.cross_entropy(s[keep], labels[keep], reduction="mean")
    return alpha * T ** 2 * d.mean() + (1 - alpha) * ce


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (0.5, 0.1), (2.0, 1.0), (3.0, 0.0)])
def test_loss_matches_float64_reference(kind, T, alpha):
    student, teacher, labels = random_case(seed=int(T * 10 + alpha * 100))
    got = DistillationLoss(T, alpha, kind, beta=0.3)(student, teacher, labels)
    want = reference_loss(student, teacher, labels, T, alpha, kind, beta=0.3)
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_matches_autograd_reference(kind):
    student, teacher, labels = random_case(seed=3)
    x = student.clone().requires_grad_()
    DistillationLoss(2.0, 0.7, kind, beta=0.4, chunk_size=4)(x, teacher, labels).backward()
    ref = student.double().clone().requires_grad_()
    reference_loss(ref, teacher, labels, 2.0, 0.7, kind, beta=0.4).backward()
    assert torch.allclose(x.grad.double(), ref.grad, atol=1e-6)
    masked = labels == -100
    assert x.grad[masked].abs().max() == 0  # ignored positions get no gradient


def test_jsd_endpoints_are_the_two_kls():
    student, teacher, labels = random_case(seed=4)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = DistillationLoss(2.0, 0.6, "jsd", beta=beta)(student, teacher, labels)
        kl = DistillationLoss(2.0, 0.6, kind)(student, teacher, labels)
        assert torch.allclose(jsd, kl, atol=1e-7)
        assert abs(kl.item() - reference_loss(student, teacher, labels, 2.0, 0.6, kind).item()) < 1e-5
    # and the scaled JSD tends to them: JSD/beta -> forward KL, JSD/(1 - beta) -> reverse KL
    s, t = student.double() / 4, teacher.double() / 4  # float64 in, float64 out
    for beta, kind, scale in ((1e-5, "forward_kl", 1e-5), (1 - 1e-5, "reverse_kl", 1e-5)):
        jsd = DistillationLoss(1.0, 1.0, "jsd", beta=beta)(s, t, labels) / scale
        kl = DistillationLoss(1.0, 1.0, kind)(s, t, labels)
        assert abs(jsd.item() / kl.item() - 1) < 1e-3


def test_chunking_and_dtype_do_not_change_the_loss():
    student, teacher, labels = random_case(B=2, T=9, V=300, seed=5)
    values = [DistillationLoss(2.0, 0.5, chunk_size=c)(student, teacher, labels).item()
              for c in (None, 1, 4, 7, 1000)]
    assert max(values) - min(values) < 1e-5
    bf16 = DistillationLoss(2.0, 0.5)(student.bfloat16(), teacher.bfloat16(), labels).item()
    assert abs(bf16 - values[0]) / values[0] < 0.05


def test_masked_positions_do_not_count():
    student, teacher, labels = random_case(seed=6)
    loss = DistillationLoss(2.0, 0.5)
    before = loss(student, teacher, labels)
    changed = student.clone()
    changed[labels == -100] += 100 * torch.randn_like(changed[labels == -100])
    teacher2 = teacher.clone()
    teacher2[labels == -100] = 0
    assert torch.allclose(before, loss(changed, teacher2, labels))
    _, parts = loss(student, teacher, labels, return_parts=True)
    assert set(parts) == {"kd", "ce"} and parts["kd"] > 0 and parts["ce"] > 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(kd_temperature=0.0), "kd_temperature=0.0; allowed: > 0.0"), (dict(kd_temperature=-1.0), "kd_temperature"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(kind="kl"), "kind"),
    (dict(beta=2.0), "beta"), (dict(chunk_size=0), "chunk_size")])
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DistillationLoss(**kwargs)


def test_bad_inputs_raise():
    student, teacher, labels = random_case()
    loss = DistillationLoss()
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(student, teacher[:, :-1], labels)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        loss(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="teacher"):
        loss(student, None, labels)
    v, i = teacher.topk(5, -1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss(student, TopKLogits(v, i + 1000), labels)


# ----------------------------------------------------------------- top-k teacher logits


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_full_vocabulary_equals_live_teacher(kind):
    student, teacher, labels = random_case(seed=7)
    v, i = teacher.topk(teacher.shape[-1], -1)
    live = DistillationLoss(2.0, 0.5, kind)(student, teacher, labels)
    cached = DistillationLoss(2.0, 0.5, kind)(student, TopKLogits(v, i), labels)
    assert abs(live.item() - cached.item()) < 1e-5


def test_topk_forward_kl_renormalises_the_teacher():
    student, teacher, labels = random_case(seed=8)
    k, T = 5, 2.0
    v, i = teacher.topk(k, -1)
    got = DistillationLoss(T, 1.0)(student, TopKLogits(v, i), labels).item()
    keep = labels != -100
    q = torch.softmax(v.double() / T, -1)[keep]  # teacher renormalised over its top-k
    logp = torch.log_softmax(student.double() / T, -1).gather(-1, i)[keep]  # full student
    want = T ** 2 * (q * (q.log() - logp)).sum(-1).mean().item()
    assert abs(got - want) < 1e-5
    # reverse KL compares on the same k tokens, with the student renormalised there too
    p = torch.softmax(student.double().gather(-1, i) / T, -1)[keep]
    want_r = T ** 2 * (p * (p.log() - q.log())).sum(-1).mean().item()
    got_r = DistillationLoss(T, 1.0, "reverse_kl")(student, TopKLogits(v, i), labels).item()
    assert abs(got_r - want_r) < 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_reference_is_the_loss_per_position(kind):
    student, teacher, labels = random_case(seed=10)
    per = divergence_reference(student, teacher, kd_temperature=2.0, kind=kind, beta=0.3)
    assert per.shape == labels.shape
    keep = labels != -100
    got = DistillationLoss(2.0, 1.0, kind, beta=0.3)(student, teacher, labels)
    assert abs(got.item() - 4 * per[keep].mean().item()) < 1e-5
    every = DistillationLoss(2.0, 1.0, kind, beta=0.3)(student, teacher)  # no labels: every position
    assert abs(every.item() - 4 * per.mean().item()) < 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_soft_target_loss_is_the_unchunked_distillation_loss(kind):
    student, teacher, _ = random_case(seed=11)
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    chunked = DistillationLoss(2.0, 1.0, kind, beta=0.3, chunk_size=4)(a, teacher)  # no labels: every position
    plain = soft_target_loss(b, teacher, 2.0, kind, beta=0.3)
    assert abs(chunked.item() - plain.item()) < 1e-5
    chunked.backward()
    plain.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
