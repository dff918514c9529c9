"""The baseline lesson's widget and exercise checkers."""

import matplotlib.pyplot as plt
import pytest
import torch

from distill_lab.exercises.baseline import check_perplexity, check_temperature_softmax
from distill_lab.widgets import temperature_widget


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def test_temperature_widget_recomputes_on_slider_change():
    logits = torch.linspace(-2, 2, 20)
    w = temperature_widget(logits, _Tok(), k=5)
    w.children[0].value = 0.5
    cold = w.result
    w.children[0].value = 3.0
    hot = w.result
    assert cold["temperature"] == 0.5 and hot["temperature"] == 3.0
    assert cold["entropy_bits"] < hot["entropy_bits"]
    assert cold["tokens"][0] == "t19" and len(hot["probs"]) == 5
    plt.close("all")


def test_exercise_checkers_accept_right_and_reject_wrong(capsys):
    assert check_perplexity(lambda nll: nll.mean().exp())
    assert check_temperature_softmax(lambda z, t: torch.softmax(z / t, dim=-1))
    with pytest.raises(AssertionError):
        check_perplexity(lambda nll: nll.exp().mean())
    with pytest.raises(AssertionError):
        check_temperature_softmax(lambda z, t: torch.softmax(z * t, dim=-1))

    def stub(*args):
        raise NotImplementedError

    assert check_perplexity(stub) is False
    assert "not attempted" in capsys.readouterr().out
