"""Shared pytest fixtures: tiny random models for fast tests and the real teacher for a few."""

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# bf16="auto" follows a timing of this machine; unit tests keep the former defaults (bf16 on) so their
# numbers do not depend on the CPU. tests/test_hardware.py clears it.
os.environ.setdefault("DISTILL_LAB_BF16", "1")
# Likewise the int8/int4 kernel paths: the integer kernel wherever it applies, no timing (quantization.dispatch).
# tests/quantization/test_dispatch.py measures them with injected timings.
os.environ.setdefault("DISTILL_LAB_KERNELS", "fixed")


@pytest.fixture
def tiny():
    """A tiny random Llama (2 layers, width 32, vocab 256)."""
    from distill_lab.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def teacher():
    """The real offline teacher and tokenizer (loaded once per test session)."""
    from distill_lab.models import load_teacher

    return load_teacher(device="cpu")


@pytest.fixture
def scratch_steps():
    """Register test-only steps and remove them afterwards."""
    from distill_lab import pipeline

    added = []

    def add(name, fn):
        pipeline.register_step(name, fn)
        added.append(name)

    yield add
    for name in added:
        pipeline.STEPS.pop(name, None)
