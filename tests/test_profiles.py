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


def test_every_lesson_size_comes_from_the_profile():
    """Lesson sizes live in profiles.LESSONS, not in per-notebook {...}[profile.name] tables (issue 32)."""
    import json
    from pathlib import Path

    from distill_lab.profiles import LESSONS, PROFILES

    for lesson, per_profile in LESSONS.items():
        assert set(per_profile) == set(PROFILES), lesson
        keys = {name: set(sizes) for name, sizes in per_profile.items()}
        assert len({frozenset(k) for k in keys.values()}) == 1, f"lesson {lesson}: profiles differ in keys {keys}"
    a = PROFILES["laptop"].lesson("03")
    a["heal_steps"] = -1  # a copy: the table is not changed through it
    assert PROFILES["laptop"].lesson("03")["heal_steps"] == 24
    with pytest.raises(ValueError, match="lesson='05'; allowed: 00, 01, 02, 03, 04"):
        PROFILES["laptop"].lesson("05")
    assert "lesson" not in json.dumps(PROFILES["laptop"].to_dict())  # recipe records compare to_dict()
    root = Path(__file__).resolve().parents[1] / "notebooks"
    for nb in sorted(root.glob("[0-9]*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        assert "[profile.name]" not in code, f"{nb.name} keeps a size table of its own; move it to profiles.LESSONS"
