import pytest
import torch

from distill_lab.profiles import PROFILES, Profile, get_profile


def test_env_var_selects_profile(monkeypatch):
    monkeypatch.setenv("DISTILL_LAB_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    assert get_profile("LAPTOP").name == "laptop"


def test_default_profile_depends_on_cuda(monkeypatch):
    monkeypatch.delenv("DISTILL_LAB_PROFILE", raising=False)
    assert get_profile().name == ("gpu" if torch.cuda.is_available() else "laptop")


def test_unknown_profile_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'huge'.*smoke, laptop, gpu"):
        get_profile("huge")


def test_profiles_grow_and_validate():
    assert PROFILES["smoke"].eval_windows < PROFILES["laptop"].eval_windows <= PROFILES["gpu"].eval_windows
    with pytest.raises(ValueError, match="seq_len"):
        Profile(**{**PROFILES["smoke"].to_dict(), "seq_len": 0})
