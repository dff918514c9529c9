"""Every KL of the package is ``distillation.losses``': QAT, healing and the lesson's view agree with it on random logits."""

import copy

import pytest
import torch

from distill_lab.distillation import (KD_TEMPERATURE, DistillationLoss, divergence_reference, kl_divergence,
                                      soft_target_loss)
from distill_lab.models import tiny_llama
from distill_lab.pruning import healing
from distill_lab.quantization import qat
from distill_lab.quantization.configs import Int8WeightOnlyConfig
from distill_lab.views.distillation import distillation_view


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def _logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3


def test_kl_divergence_is_the_textbook_formula_and_zero_on_itself():
    s, t = _logits(4, 5, 17)
    logp, logq = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    want = (logq.exp() * (logq - logp)).sum(-1)
    assert torch.equal(kl_divergence(logq.exp(), logq, logp), want)
    assert torch.equal(divergence_reference(s.double(), t.double()), want)
    assert kl_divergence(logq.exp(), logq, logq).abs().max() == 0
    assert KD_TEMPERATURE == 1.0 and DistillationLoss().kd_temperature == KD_TEMPERATURE


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
def test_soft_target_loss_matches_the_formula(kd_temperature):
    s, t = _logits(2, 3, 11, seed=1)
    q = torch.softmax(t.double() / kd_temperature, -1)
    want = (q * (q.log() - torch.log_softmax(s.double() / kd_temperature, -1))).sum(-1).mean() * kd_temperature ** 2
    assert soft_target_loss(s, t, kd_temperature).item() == pytest.approx(want.item(), rel=1e-5)


def _loss_given_to_the_trainer(monkeypatch, module, run) -> object:
    """The ``loss`` a caller hands to ``DistillationTrainer`` (the trainer is replaced by a recorder)."""
    seen = {}

    class Recorder:
        def __init__(self, *args, loss=None, **kwargs):
            seen["loss"] = loss

        def train(self):
            return {"train": []}

    monkeypatch.setattr(module, "DistillationTrainer", Recorder)
    run()
    return seen["loss"]


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
def test_qat_and_healing_losses_agree_with_the_one_divergence(monkeypatch, kd_temperature):
    model, windows = tiny_llama(), torch.randint(0, 64, (4, 6))
    student = copy.deepcopy(model)
    qat.prepare_qat_(student, Int8WeightOnlyConfig())
    s, t = _logits(2, 5, 23, seed=2)
    want = soft_target_loss(s, t, kd_temperature).item()
    runs = {
        "train_qat": (qat, lambda: qat.train_qat(student, model, windows, steps=1,
                                                 kd_temperature=kd_temperature, progress=False)),
        "heal": (healing, lambda: healing.heal(model, model, windows, steps=1, kd_temperature=kd_temperature,
                                               progress=False)),
        "heal local": (healing, lambda: healing.heal(model, model, windows, steps=1, kd_temperature=kd_temperature,
                                                     progress=False, use_trainer=False)),
    }
    for name, (module, run) in runs.items():
        loss = _loss_given_to_the_trainer(monkeypatch, module, run)
        assert loss(s, t).item() == pytest.approx(want, rel=1e-5), name


def test_kl_to_teacher_is_the_mean_per_token_divergence():
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    windows = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = divergence_reference(student(windows).logits.float(), teacher(windows).logits.float()).mean().item()
    assert healing.kl_to_teacher(student, teacher, windows, batch_size=2) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kd_temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0)])
def test_distillation_view_is_the_loss_at_one_position(kd_temperature, alpha):
    s, t = _logits(40, seed=3)
    view = distillation_view(s, t, 5, _Tok(), kd_temperature, alpha, k=4)
    kl = divergence_reference(s[None], t[None], kd_temperature).item()
    assert view["kl"] == pytest.approx(kl, rel=1e-5)
    loss = DistillationLoss(kd_temperature, alpha)(s[None, None], t[None, None], torch.tensor([[5]])).item()
    assert view["total"] == pytest.approx(loss, rel=1e-5)
    assert view["kd_term"] == pytest.approx(alpha * kd_temperature ** 2 * kl, rel=1e-5)
