"""Tests for distill_lab.pruning.selection: filter_fn, the deprecated exclude globs, calibration batches."""

import pytest
import torch
from torch import nn

from distill_lab.pruning import selection as S


def test_default_filter_leaves_head_and_embeddings_dense(tiny):
    names = set(S.prunable_linears(tiny))
    assert "lm_head" not in names
    assert names == {n for n, m in tiny.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert S.default_filter(None, "model.embed_tokens") is False and S.default_filter(None, "lm_head") is False
    assert S.default_filter(None, "model.layers.0.mlp.up_proj") is True


def test_filter_fn_selects_layers(tiny):
    mlp = S.prunable_linears(tiny, lambda module, name: ".mlp." in name)
    assert mlp and all(".mlp." in n for n in mlp)
    everything = S.prunable_linears(tiny, lambda module, name: True)
    assert "lm_head" in everything


def test_exclude_globs_builds_a_filter_fn(tiny):
    f = S.exclude_globs(("lm_head", "*self_attn*"))
    names = S.prunable_linears(tiny, f)
    assert names and not any("self_attn" in n for n in names) and "lm_head" not in names
    assert S.exclude_globs("lm_head")(None, "lm_head") is False  # one pattern as a string


def test_filter_fn_is_the_one_way_to_select_layers(tiny):
    with pytest.raises(TypeError, match="exclude"):
        S.prunable_linears(tiny, exclude=("lm_head",))
    with pytest.raises(ValueError, match=r"filter_fn=\('lm_head',\).*exclude_globs"):  # globs are not a filter
        S.prunable_linears(tiny, ("lm_head",))
    with pytest.raises(ValueError, match="filter_fn=3"):
        S.prunable_linears(tiny, 3)


def test_as_batches():
    x = torch.zeros(2, 5, dtype=torch.long)
    assert len(S.as_batches(x)) == 1 and len(S.as_batches(torch.zeros(3, 2, 5))) == 3
    with pytest.raises(ValueError, match="calibration"):
        S.as_batches(None)
    with pytest.raises(ValueError, match="calibration is empty"):
        S.as_batches([])
