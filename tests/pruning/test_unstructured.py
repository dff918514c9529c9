"""Tests for distill_lab.pruning.unstructured: magnitude and Wanda (unstructured, 2:4) and prune_."""

import copy

import pytest
import torch

import distill_lab as dl
from distill_lab.pruning import unstructured as U
from distill_lab.pruning.masks import is_nm_sparse
from distill_lab.pruning.selection import exclude_globs, prunable_linears
from distill_lab.pruning.sparse_storage import sparsity_stats
from distill_lab.pruning.structured import StructuredConfig, prune_structured


# ---------------------------------------------------------------- configs and ValueErrors

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        U.MagnitudeConfig(bad)
    with pytest.raises(ValueError, match="sparsity"):
        U.WandaConfig(bad)


def test_config_field_errors_name_the_field():
    with pytest.raises(ValueError, match="granularity"):
        U.MagnitudeConfig(0.5, granularity="column")
    with pytest.raises(ValueError, match="pattern"):
        U.MagnitudeConfig(0.5, pattern="2-4")
    with pytest.raises(ValueError, match="implies sparsity=0.5"):
        U.WandaConfig(0.3, pattern="2:4")


def test_calibration_required_for_wanda(tiny):
    with pytest.raises(ValueError, match="calibration"):
        U.prune_(tiny, U.WandaConfig(0.5))


def test_prune_rejects_other_configs(tiny):
    with pytest.raises(ValueError, match="allowed: MagnitudeConfig, WandaConfig or StructuredConfig"):
        U.prune_(tiny, {"sparsity": 0.5})


# ---------------------------------------------------------------- pruning a model

@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_50_exact_per_row(tiny, calib, sequential):
    report = U.prune_(tiny, U.WandaConfig(0.5, sequential=sequential), calibration=calib())
    linears = prunable_linears(tiny)
    assert set(report) == set(linears) and "lm_head" not in report
    for name, lin in linears.items():
        zeros_per_row = (lin.weight == 0).sum(1)
        assert (zeros_per_row == lin.in_features // 2).all(), name
    # the embedding (tied head) stays dense
    assert (tiny.model.embed_tokens.weight != 0).all()


def test_magnitude_layer_granularity_exact_per_layer(tiny):
    U.prune_(tiny, U.MagnitudeConfig(0.3, granularity="layer"))
    for lin in prunable_linears(tiny).values():
        assert int((lin.weight == 0).sum()) == int(0.3 * lin.weight.numel())


@pytest.mark.parametrize("config", [U.MagnitudeConfig(pattern="2:4"), U.WandaConfig(pattern="2:4")])
def test_two_four_every_group_has_two_zeros(tiny, calib, config):
    U.prune_(tiny, config, calibration=calib())
    for lin in prunable_linears(tiny).values():
        groups = lin.weight.reshape(lin.out_features, -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()
        assert is_nm_sparse(lin.weight, 2, 4)


def test_wanda_uses_activations_not_only_weights(tiny, calib):
    """Wanda and magnitude choose different weights once inputs are uneven."""
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    U.prune_(a, U.MagnitudeConfig(0.5))
    U.prune_(b, U.WandaConfig(0.5, sequential=False), calibration=calib())
    wa, wb = a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wa == 0, wb == 0)


def test_precomputed_norms_match_one_shot(tiny, calib):
    batches = calib()
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    U.prune_(a, U.WandaConfig(0.4, sequential=False), calibration=batches)
    U.prune_(b, U.WandaConfig(0.4), norms=U.input_norms(b, calibration=batches))
    for (n, la), lb in zip(prunable_linears(a).items(), prunable_linears(b).values()):
        assert torch.equal(la.weight, lb.weight), n


def test_norms_must_cover_every_pruned_layer(tiny, calib):
    norms = U.input_norms(tiny, calibration=calib(), filter_fn=lambda m, n: ".mlp." in n)
    with pytest.raises(ValueError, match="norms lack"):
        U.prune_(tiny, U.WandaConfig(0.5), norms=norms)


def test_wanda_sequential_matches_reference_on_first_block(tiny, calib):
    """Block 0 sees the same inputs in both modes, so its masks must agree."""
    batches = calib()
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    U.prune_(a, U.WandaConfig(0.5, sequential=True), calibration=batches)
    U.prune_(b, U.WandaConfig(0.5, sequential=False), calibration=batches)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)


# ---------------------------------------------------------------- layer selection

def test_exclude_globs_as_filter_fn(tiny):
    U.prune_(tiny, U.MagnitudeConfig(0.5), filter_fn=exclude_globs(("lm_head", "*embed*", "*self_attn*")))
    assert (tiny.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (tiny.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    with pytest.raises(TypeError, match="exclude"):  # the config's old exclude field is gone
        U.MagnitudeConfig(0.5, exclude=("lm_head",))


def test_filter_fn_selects_the_pruned_layers(tiny, calib):
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    report = U.prune_(a, U.MagnitudeConfig(0.5), filter_fn=lambda module, name: ".mlp." in name)
    assert report and all(".mlp." in n for n in report)
    assert (a.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (a.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    # Wanda (sequential and one-shot) honours it too, and the globs helper gives the same layers
    for sequential in (True, False):
        m = copy.deepcopy(tiny)
        rep = U.prune_(m, U.WandaConfig(0.5, sequential=sequential), calibration=calib(),
                       filter_fn=exclude_globs(("lm_head", "*embed*", "*self_attn*")))
        assert set(rep) == set(report)
        assert (m.model.layers[1].self_attn.o_proj.weight != 0).all()
    stats = sparsity_stats(a, lambda module, name: ".mlp." in name)
    assert set(stats["layers"]) == set(report) and stats["linear"]["sparsity"] == 0.5
    U.prune_(b, U.MagnitudeConfig(0.5), filter_fn=lambda module, name: True)  # the head too
    assert (b.lm_head.weight == 0).float().mean() == 0.5


# ---------------------------------------------------------------- prune_ with a StructuredConfig

def test_prune_accepts_structured_config_in_place(gqa_tiny, calib):
    model = gqa_tiny()
    want = prune_structured(model, StructuredConfig(heads_keep=2 / 3, channels_keep=0.5, layers_keep=0.75,
                                                    importance="activation"), calibration=calib(vocab=128))
    before = sum(p.numel() for p in model.parameters())
    report = U.prune_(model, StructuredConfig(heads_keep=2 / 3, channels_keep=0.5, layers_keep=0.75,
                                              importance="activation"), calibration=calib(vocab=128))
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (3, 6, 32)
    assert len(model.model.layers) == 3 and model.model.layers[0].self_attn.q_proj.weight.shape == (48, 72)
    after = sum(p.numel() for p in model.parameters())
    assert report == {"model": pytest.approx(1 - after / before)}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    x = calib(vocab=128)[0]
    with torch.no_grad():
        assert torch.equal(model(x).logits, want(x).logits)
    with pytest.raises(ValueError, match="filter_fn and norms apply to"):
        U.prune_(model, StructuredConfig(channels_keep=0.5), filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="calibration"):
        U.prune_(model, StructuredConfig(layers_keep=0.5))


# ---------------------------------------------------------------- the real teacher

@pytest.mark.teacher
def test_teacher_wanda_beats_magnitude_at_50(teacher):
    """Acceptance: Wanda's test perplexity at 50 % is below magnitude's on the teacher."""
    model, tok = teacher
    test = dl.corpus_windows("pydoc", "test", tok, 128, max_windows=6)
    train = dl.corpus_windows("pydoc", "train", tok, 128)
    batches = dl.calibration_batches(train, 4, 4)
    norms = U.input_norms(model, calibration=batches)
    ppl = {}
    for name, cfg in (("magnitude", U.MagnitudeConfig(0.5)), ("wanda", U.WandaConfig(0.5))):
        m = copy.deepcopy(model)
        U.prune_(m, cfg, norms=norms)
        stats = sparsity_stats(m)
        assert all(v["sparsity"] == 0.5 for v in stats["layers"].values())
        ppl[name] = dl.perplexity(m, test, bf16=True, progress=False)
        del m
    assert ppl["wanda"] < ppl["magnitude"], ppl
