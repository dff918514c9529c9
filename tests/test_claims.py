"""distill_lab.claims: a claim prints one readable line; a failed one raises unless it only warns."""

import pytest

import distill_lab as dl
from distill_lab.claims import ClaimError, claim, verdict


def test_claim_that_holds_prints_a_tick(capsys):
    assert bool(claim(219 < 291, "forward KL beats CE: 219 < 291")) is True
    assert capsys.readouterr().out == "✓ forward KL beats CE: 219 < 291\n"


def test_failed_quality_claim_raises_an_assertion_error(capsys):
    with pytest.raises(ClaimError, match="✗ W8A8 within 3 %: \\+4.1 %"):
        claim(4.1 <= 3, "W8A8 within 3 %: +4.1 %")
    assert issubclass(ClaimError, AssertionError)  # nbval and pytest count it as a failed check
    assert capsys.readouterr().out == ""


def test_failed_speed_claim_only_warns(capsys):
    assert bool(claim(0.9 > 1.2, "width 50% prefill faster: 0.90x", warn=True)) is False
    out = capsys.readouterr().out
    assert out.startswith("⚠ width 50% prefill faster: 0.90x") and "✓" not in out


def test_claim_accepts_numpy_and_torch_booleans(capsys):
    import torch
    assert bool(claim(torch.tensor(1.0) < 2, "a tensor comparison")) is True
    assert "✓" in capsys.readouterr().out


def test_claim_needs_a_statement():
    with pytest.raises(ValueError, match="text="):
        claim(True, "  ")


def test_verdict_names_what_fails():
    assert verdict({"size": True, "speed": True}) == "holds"
    assert verdict({"size": False, "speed": False}) == "does not hold"
    assert verdict({"size": True, "quality": False}) == "partly holds (size ✓, quality ✗)"
    assert verdict({"size": True, "speed": None}) == "partly holds (size ✓, speed within noise)"
    assert verdict({"speed": None}) == "partly holds (speed within noise)"
    assert verdict({"size": False, "speed": None}) == "does not hold (size ✗, speed within noise)"
    with pytest.raises(ValueError, match="True, False or None"):
        verdict({"speed": 1.2})
    with pytest.raises(ValueError):
        verdict({})


def test_exported_from_the_package():
    assert dl.claim is claim and dl.ClaimError is ClaimError and dl.verdict is verdict


def test_a_claim_as_a_cells_last_value_shows_nothing():
    result = claim(True, "shown once, by the printed line")
    assert hasattr(result, "_ipython_display_") and result._ipython_display_() is None
    assert "held" in repr(result) and result.text == "shown once, by the printed line"
