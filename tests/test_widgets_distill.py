"""The distillation lesson's widget, plots and exercise checkers."""

import matplotlib.pyplot as plt
import pytest
import torch

from distill_lab.exercises.distillation import check_kd_loss, check_reverse_kl, check_topk_teacher
from distill_lab.plotting import plot_topk_fidelity, plot_val_curves
from distill_lab.views.distillation import distillation_view
from distill_lab.widgets import distillation_widget


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def test_distillation_widget_recomputes_on_slider_change():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(40, generator=g), torch.randn(40, generator=g) * 3
    w = distillation_widget(student, teacher, target=3, tokenizer=_Tok(), k=5)
    w.children[0].value, w.children[1].value = 1.0, 0.0
    cold = w.result
    w.children[0].value, w.children[1].value = 4.0, 1.0
    hot = w.result
    assert cold["kd_temperature"] == 1.0 and hot["alpha"] == 1.0
    assert cold["teacher_entropy_bits"] < hot["teacher_entropy_bits"]
    assert cold["total"] == pytest.approx(cold["ce"]) and hot["total"] == pytest.approx(16 * hot["kl"])
    assert hot["tokens"][0] == f"t{int(teacher.argmax())}" and len(hot["student_probs"]) == 5
    # the view's KL is the textbook one
    q, p = torch.softmax(teacher / 4, -1), torch.softmax(student / 4, -1)
    assert hot["kl"] == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-5)
    plt.close("all")


def test_lesson_plots_draw():
    view = distillation_view(torch.zeros(10), torch.arange(10.0), 2, _Tok(), 2.0, 0.5, k=4)
    assert len(view["tokens"]) == 4
    history = {"eval": [{"step": 0, "val_ppl": 100.0}, {"step": 5, "val_ppl": 40.0}]}
    assert plot_val_curves({"a": history, "b": history}, teacher_ppl=20.0) is not None
    rows = [{"k": k, "rel_error": 1 / k, "teacher_mass": 1 - 1 / k} for k in (1, 4, 16)]
    assert plot_topk_fidelity(rows) is not None
    plt.close("all")


def test_exercise_checkers_accept_right_and_reject_wrong(capsys):
    def kd(s, t, T):
        return T ** 2 * (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1)
                                                     - torch.log_softmax(s / T, -1))).sum(-1).mean()

    def rkl(s, t, T):
        return (torch.softmax(s / T, -1) * (torch.log_softmax(s / T, -1)
                                            - torch.log_softmax(t / T, -1))).sum(-1).mean()

    def topk(v, i, V, T):
        return torch.zeros(*v.shape[:-1], V).scatter_(-1, i, torch.softmax(v / T, -1))

    assert check_kd_loss(kd) and check_reverse_kl(rkl) and check_topk_teacher(topk)
    with pytest.raises(AssertionError):
        check_kd_loss(lambda s, t, T: kd(s, t, T) / T ** 2)  # forgot T²
    with pytest.raises(AssertionError):
        check_reverse_kl(lambda s, t, T: kd(t, s, T) / T ** 2 + 0.1)
    with pytest.raises(AssertionError):
        check_topk_teacher(lambda v, i, V, T: torch.zeros(*v.shape[:-1], V).scatter_(-1, i, torch.softmax(v, -1)))

    def stub(*args):
        raise NotImplementedError

    assert check_kd_loss(stub) is False
    assert "not attempted" in capsys.readouterr().out
