"""Tests for distill_lab.calibration: one forward pass over calibration batches with temporary hooks."""

import pytest
import torch

import distill_lab as dl
from distill_lab.calibration import calibration_pass


def _batches(n=3, b=2, t=8, vocab=256):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def test_counts_tokens_calls_before_batch_and_removes_hooks():
    model = dl.tiny_llama().eval()
    seen, order = [], []
    down = model.model.layers[0].mlp.down_proj
    handles = [down.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))]
    with torch.inference_mode():
        tokens = calibration_pass(model, _batches(), handles, before_batch=lambda b: order.append(b.shape),
                                  use_cache=False)
    assert tokens == 3 * 2 * 8
    assert order == [torch.Size([2, 8])] * 3
    assert seen == [torch.Size([2, 8, 64])] * 3         # (B, T, intermediate) once per batch
    assert not down._forward_pre_hooks                  # removed after the pass


def test_hooks_are_removed_when_a_forward_fails():
    model = dl.tiny_llama().eval()
    down = model.model.layers[0].mlp.down_proj
    handles = [down.register_forward_pre_hook(lambda m, args: None)]
    bad = [torch.full((1, 4), 10_000)]                   # ids beyond the 256-token vocabulary
    with pytest.raises(IndexError):
        calibration_pass(model, bad, handles)
    assert not down._forward_pre_hooks
