"""Tests for distill_lab.pruning.structured: importance, Block Influence, heads / channels / layers removed."""

import math

import pytest
import torch

from distill_lab.pruning import structured as S


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- configs and ValueErrors

def test_config_field_errors_name_the_field():
    with pytest.raises(ValueError, match="importance='gradient'"):
        S.StructuredConfig(importance="gradient")
    with pytest.raises(ValueError, match="head_granularity"):
        S.StructuredConfig(head_granularity="key")


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.01, 2])
def test_keep_ratio_outside_range_is_rejected(tiny, ratio):
    with pytest.raises(ValueError, match=r"keep_ratio.*\(0, 1\]"):
        S.prune_heads(tiny, ratio)


def test_keep_ratio_that_leaves_no_heads_is_rejected(gqa_tiny):
    model = gqa_tiny()
    with pytest.raises(ValueError, match="rounds to 0"):
        S.prune_heads(model, 0.1)  # 0.1 * 3 query heads per group
    with pytest.raises(ValueError, match="rounds to 0"):
        S.prune_heads(model, 0.1, granularity="kv_group")


def test_unknown_importance_is_rejected(tiny):
    with pytest.raises(ValueError, match="importance='random'.*allowed: l2_norm, magnitude, taylor, activation"):
        S.prune_heads(tiny, 0.5, importance="random")
    with pytest.raises(ValueError, match="importance"):
        S.importance(tiny, "gradient")


def test_calibration_required_for_data_importance(tiny):
    with pytest.raises(ValueError, match="calibration"):
        S.importance(tiny, "taylor")
    with pytest.raises(ValueError, match="calibration"):
        S.prune_layers(tiny, 0.5, calibration=None)


def test_needs_calibration():
    assert not S.StructuredConfig(channels_keep=0.5).needs_calibration
    assert S.StructuredConfig(channels_keep=0.5, importance="taylor").needs_calibration
    assert not S.StructuredConfig(importance="activation").needs_calibration  # nothing removed
    assert S.StructuredConfig(layers_keep=0.5).needs_calibration


# ---------------------------------------------------------------- importance is the one word (no method=)

def test_method_is_not_a_second_name_for_importance(tiny):
    with pytest.raises(TypeError, match="method"):
        S.StructuredConfig(channels_keep=0.5, method="taylor")
    with pytest.raises(TypeError, match="method"):
        S.importance(tiny, method="magnitude")
    with pytest.raises(TypeError):  # calibration is keyword-only, as in awq_ / gptq_ / smooth_
        S.prune_layers(tiny, 0.5, [torch.zeros(1, 4, dtype=torch.long)])


def test_a_recipe_that_says_method_for_importance_is_refused_by_name(tmp_path):
    from distill_lab.pipeline import Recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nsteps:\n  - prune: {channels_keep: 0.5, method: activation}\n")
    with pytest.raises(ValueError, match="method"):
        Recipe.load(path)
    Recipe("r", [{"prune": {"channels_keep": 0.5, "importance": "taylor"}}])


# ---------------------------------------------------------------- importance scores

@pytest.mark.parametrize("importance", S.IMPORTANCE_METRICS)
def test_importance_shapes_and_methods_differ(importance, gqa_tiny, calib):
    model = gqa_tiny()
    s = S.importance(model, importance, calibration=calib(vocab=128))
    assert s["heads"].shape == (4, 9) and s["kv_groups"].shape == (4, 3) and s["channels"].shape == (4, 64)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())


def test_importance_l2_norm_and_magnitude_by_hand(gqa_tiny):
    model = gqa_tiny()
    blk = model.model.layers[1]
    j = 5
    w = [t.detach() for t in (blk.mlp.gate_proj.weight[j], blk.mlp.up_proj.weight[j], blk.mlp.down_proj.weight[:, j])]
    l2 = S.importance(model, "l2_norm")["channels"][1, j]
    mag = S.importance(model, "magnitude")["channels"][1, j]
    assert l2.item() == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in w)), rel=1e-5)
    assert mag.item() == pytest.approx(sum(float(t.abs().sum()) for t in w) / sum(t.numel() for t in w), rel=1e-5)


def test_taylor_is_first_order_loss_change(gqa_tiny, calib):
    """|grad . w| of a channel predicts the loss change when that channel is zeroed (to first order)."""
    model = gqa_tiny()
    batches = calib(vocab=128)
    s = S.importance(model, "taylor", calibration=batches)["channels"]
    # recompute by hand for one channel
    for p in model.parameters():
        p.grad = None
    loss = sum(model(b, labels=b).loss for b in batches) / len(batches)
    loss.backward()
    blk = model.model.layers[2].mlp
    j = 7
    by_hand = (blk.gate_proj.weight.grad[j] * blk.gate_proj.weight[j]).sum() + \
        (blk.up_proj.weight.grad[j] * blk.up_proj.weight[j]).sum() + \
        (blk.down_proj.weight.grad[:, j] * blk.down_proj.weight[:, j]).sum()
    assert s[2, j].item() == pytest.approx(abs(by_hand.item()), rel=1e-3, abs=1e-7)
    # and the model's own gradients/flags were restored by importance()
    assert all(p.requires_grad for p in model.parameters())


def test_activation_importance_by_hand(gqa_tiny, calib):
    model = gqa_tiny()
    batches = calib(vocab=128)
    s = S.importance(model, "activation", calibration=batches)
    captured = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    acts = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])  # (tokens, I)
    torch.testing.assert_close(s["channels"][0], acts.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_block_influence_identity_block_scores_zero(gqa_tiny, calib):
    model = gqa_tiny()
    blk = model.model.layers[2]
    with torch.no_grad():  # a block whose residual branches output zero changes nothing
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    bi = S.block_influence(model, calib(vocab=128))
    assert bi.shape == (4,)
    assert bi[2].item() == pytest.approx(0.0, abs=1e-6)
    assert (bi[[0, 1, 3]] > 1e-4).all()
    pruned = S.prune_layers(model, 0.75, calibration=calib(vocab=128))
    assert pruned.config.num_hidden_layers == 3
    # the identity block was the one removed: outputs are unchanged
    x = calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- selection and the smaller model

def test_select_units():
    heads, kv = S.select_heads(torch.tensor([[3.0, 1.0, 2.0, 0.0, 5.0, 4.0]]), torch.tensor([[1.0, 2.0]]),
                               1 / 3, "query", 3)
    assert heads[0].tolist() == [0, 4] and kv[0].tolist() == [0, 1]  # the best head of each group of 3
    heads, kv = S.select_heads(torch.zeros(1, 6), torch.tensor([[1.0, 2.0]]), 0.5, "kv_group", 3)
    assert kv[0].tolist() == [1] and heads[0].tolist() == [3, 4, 5]
    assert S.select_channels(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 0.5)[0].tolist() == [1, 3]
    assert S.select_layers(torch.tensor([0.9, 0.1, 0.5, 0.2]), 0.5) == [0, 2]


def test_prune_heads_within_groups_keeps_gqa_consistent(gqa_tiny, calib):
    from distill_lab.arch import parameter_count

    model = gqa_tiny()
    small = S.prune_heads(model, 2 / 3, importance="l2_norm")
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 3, 8)
    assert c.num_attention_heads % c.num_key_value_heads == 0
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (48, 72) and attn.k_proj.weight.shape == (24, 72)
    assert attn.o_proj.weight.shape == (72, 48)
    assert _param_count(small) == parameter_count(c)
    assert _param_count(model) == parameter_count(model.config)
    small(calib(vocab=128)[0])  # runs
    assert model.config.num_attention_heads == 9  # input untouched


def test_prune_kv_groups_removes_whole_groups(gqa_tiny):
    from distill_lab.arch import parameter_count

    model = gqa_tiny()
    small = S.prune_heads(model, 2 / 3, granularity="kv_group")
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (6, 2)
    assert _param_count(small) == parameter_count(c)


def test_removing_zero_heads_is_exact(gqa_tiny, calib):
    """If the pruned heads contribute nothing (o_proj columns zero), logits are unchanged."""
    model = gqa_tiny()
    d = 8
    with torch.no_grad():
        for blk in model.model.layers:  # head 1 of every group contributes nothing
            for h in (1, 4, 7):
                blk.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    small = S.prune_heads(model, 2 / 3, importance="l2_norm")
    x = calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


def test_removing_dead_channels_is_exact(gqa_tiny, calib):
    model = gqa_tiny()
    with torch.no_grad():
        for blk in model.model.layers:
            blk.mlp.down_proj.weight[:, 32:] = 0  # channels 32.. are dead
    small = S.prune_channels(model, 0.5, importance="magnitude")
    assert small.config.intermediate_size == 32
    x = calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("importance", S.IMPORTANCE_METRICS)
def test_structured_save_reload_identical(importance, gqa_tiny, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill_lab.arch import parameter_count

    model = gqa_tiny()
    cfg = S.StructuredConfig(heads_keep=2 / 3, head_granularity="kv_group", channels_keep=0.75,
                             layers_keep=0.75, importance=importance)
    small = S.prune_structured(model, cfg, calibration=calib(vocab=128))
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.intermediate_size == 48 and back.config.num_key_value_heads == 2
    assert _param_count(back) == parameter_count(back.config) == _param_count(small)
    x = calib(vocab=128)[0]
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(x).logits)


def test_prune_structured_in_place_matches_the_copy(gqa_tiny, calib):
    model = gqa_tiny()
    cfg = S.StructuredConfig(channels_keep=0.5, importance="l2_norm")
    want = S.prune_structured(model, cfg)
    report = S.prune_structured_(model, cfg)
    assert model.config.intermediate_size == 32 and 0 < report["model"] < 1
    x = calib(vocab=128)[0]
    with torch.no_grad():
        assert torch.equal(model(x).logits, want(x).logits)


# ---------------------------------------------------------------- the real teacher

@pytest.mark.teacher
def test_teacher_structured_prune_saves_reloads(teacher, tmp_path):
    """Acceptance: 25 % of MLP channels and a third of the KV groups removed; save, reload, same logits."""
    from transformers import AutoModelForCausalLM

    from distill_lab.arch import parameter_count

    model, tok = teacher
    small = S.prune_structured(model, S.StructuredConfig(heads_keep=2 / 3, head_granularity="kv_group",
                                                         channels_keep=0.75, importance="l2_norm"))
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (6, 2, 64, 1152)
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    n = _param_count(back)
    assert n == parameter_count(back.config) == _param_count(small)
    assert n < _param_count(model)
    x = tok("def prune(model):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(x).logits)
