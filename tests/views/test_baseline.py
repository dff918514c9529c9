"""distill_lab.views.baseline: the next-token distribution at a temperature, and its entropy."""

import pytest
import torch

from distill_lab.views import baseline


class _Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def test_temperature_view_and_entropy():
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    cold, hot = baseline.temperature_probs(logits, 0.5), baseline.temperature_probs(logits, 2.0)
    assert baseline.entropy_bits(cold) < baseline.entropy_bits(hot) <= 2.0
    assert baseline.entropy_bits(torch.full((4,), 0.25)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="temperature=0"):
        baseline.temperature_probs(logits, 0)
    view = baseline.temperature_view(logits, _Tok(), 2.0, k=2)
    assert view["tokens"] == ["t0", "t1"] and view["entropy_bits"] == baseline.entropy_bits(hot)
