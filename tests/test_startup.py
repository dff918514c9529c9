"""Import-time garbage-collector handling (distill_lab/_startup.py)."""

import gc
import json
import os
import subprocess
import sys

import pytest

from distill_lab import _startup

PROBE = """
import gc, json, sys
if sys.argv[1] == "disabled":
    gc.disable()
import distill_lab
frozen = gc.get_freeze_count()
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a          # a reference cycle made after the import
del a, b
print(json.dumps({"enabled": gc.isenabled(), "frozen": frozen, "collected": gc.collect()}))
"""


def _probe(state: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, state], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_freezes_import_time_objects_and_keeps_collecting_new_ones():
    result = _probe("enabled")
    assert result["enabled"] is True
    assert result["frozen"] > 100_000, result    # torch + transformers module objects
    assert result["collected"] >= 2, result      # the cycle made afterwards is still garbage-collected


def test_import_leaves_a_disabled_collector_disabled():
    result = _probe("disabled")
    assert result["enabled"] is False and result["frozen"] > 100_000, result


def test_opt_out_imports_with_default_behaviour():
    result = _probe("enabled", DISTILL_LAB_GC_FREEZE="0")
    assert result["frozen"] == 0 and result["enabled"] is True


def test_bad_opt_out_value_names_it(monkeypatch):
    monkeypatch.setenv("DISTILL_LAB_GC_FREEZE", "maybe")
    with pytest.raises(ValueError, match="'maybe'.*1 \\(default\\) or 0"):
        _startup.freeze_enabled()


def test_frozen_imports_restores_state_on_error(monkeypatch):
    monkeypatch.setenv("DISTILL_LAB_GC_FREEZE", "1")
    was = gc.isenabled()
    gc.enable()
    try:
        with pytest.raises(RuntimeError):
            with _startup.frozen_imports():
                assert not gc.isenabled()
                raise RuntimeError("import failed")
        assert gc.isenabled()
    finally:  # what it froze stays frozen: the permanent generation only skips collection
        if not was:
            gc.disable()
