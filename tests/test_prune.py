"""Tests for distill_lab.prune: masks, Wanda, 2:4, sparse storage, structured pruning, healing."""

import copy
import math

import pytest
import torch
from torch import nn

import distill_lab as dl
from distill_lab import prune as P


def _calib(vocab=256, n=2, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


def _gqa_tiny(seed=0):
    """A tiny Llama with the teacher's GQA shape: 9 query heads in 3 KV groups, head_dim 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- configs and ValueErrors

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        P.MagnitudeConfig(bad)
    with pytest.raises(ValueError, match="sparsity"):
        P.WandaConfig(bad)


def test_config_field_errors_name_the_field():
    with pytest.raises(ValueError, match="granularity"):
        P.MagnitudeConfig(0.5, granularity="column")
    with pytest.raises(ValueError, match="pattern"):
        P.MagnitudeConfig(0.5, pattern="2-4")
    with pytest.raises(ValueError, match="implies sparsity=0.5"):
        P.WandaConfig(0.3, pattern="2:4")
    with pytest.raises(ValueError, match="method"):
        P.StructuredConfig(method="gradient")
    with pytest.raises(ValueError, match="head_granularity"):
        P.StructuredConfig(head_granularity="key")


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.01, 2])
def test_keep_ratio_outside_range_is_rejected(tiny, ratio):
    with pytest.raises(ValueError, match=r"keep_ratio.*\(0, 1\]"):
        P.prune_heads(tiny, ratio)


def test_keep_ratio_that_leaves_no_heads_is_rejected():
    model = _gqa_tiny()
    with pytest.raises(ValueError, match="rounds to 0"):
        P.prune_heads(model, 0.1)  # 0.1 * 3 query heads per group
    with pytest.raises(ValueError, match="rounds to 0"):
        P.prune_heads(model, 0.1, granularity="kv_group")


def test_unknown_method_is_rejected(tiny):
    with pytest.raises(ValueError, match="method='random'.*allowed: l2_norm, magnitude, taylor, activation"):
        P.prune_heads(tiny, 0.5, method="random")
    with pytest.raises(ValueError, match="method"):
        P.importance(tiny, "gradient")


def test_calibration_required_for_data_methods(tiny):
    with pytest.raises(ValueError, match="calibration"):
        P.prune_(tiny, P.WandaConfig(0.5))
    with pytest.raises(ValueError, match="calibration"):
        P.importance(tiny, "taylor")
    with pytest.raises(ValueError, match="calibration"):
        P.prune_layers(tiny, 0.5, calibration=None)


# ---------------------------------------------------------------- masks

def test_unstructured_mask_exact_per_row_and_per_layer():
    scores = torch.rand(7, 40)
    row = P.unstructured_mask(scores, 0.3, "row")
    assert ((~row).sum(1) == 12).all()  # floor(0.3 * 40)
    layer = P.unstructured_mask(scores, 0.3, "layer")
    assert (~layer).sum() == int(0.3 * 280)
    # the pruned entries are the lowest scores of each row
    for r in range(7):
        assert scores[r][~row[r]].max() <= scores[r][row[r]].min()


def test_unstructured_mask_ties_keep_exact_count():
    scores = torch.zeros(3, 10)  # all tied
    assert ((~P.unstructured_mask(scores, 0.5)).sum(1) == 5).all()


def test_nm_mask_keeps_n_largest_per_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    mask = P.nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of m=4"):
        P.nm_mask(torch.rand(2, 6))


def test_wanda_scores_weight_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([10.0, 1.0])
    assert torch.equal(P.wanda_scores(w, norms), torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    # with a large input norm, a small weight outranks a large one: the point of Wanda
    mask = P.unstructured_mask(P.wanda_scores(w, norms), 0.5)
    assert mask.tolist() == [[True, False], [True, False]]


# ---------------------------------------------------------------- unstructured pruning of a model

@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_50_exact_per_row(tiny, sequential):
    report = P.prune_(tiny, P.WandaConfig(0.5, sequential=sequential), calibration=_calib())
    linears = P.prunable_linears(tiny)
    assert set(report) == set(linears) and "lm_head" not in report
    for name, lin in linears.items():
        zeros_per_row = (lin.weight == 0).sum(1)
        assert (zeros_per_row == lin.in_features // 2).all(), name
    # the embedding (tied head) stays dense
    assert (tiny.model.embed_tokens.weight != 0).all()


def test_magnitude_layer_granularity_exact_per_layer(tiny):
    P.prune_(tiny, P.MagnitudeConfig(0.3, granularity="layer"))
    for lin in P.prunable_linears(tiny).values():
        assert int((lin.weight == 0).sum()) == int(0.3 * lin.weight.numel())


@pytest.mark.parametrize("config", [P.MagnitudeConfig(pattern="2:4"), P.WandaConfig(pattern="2:4")])
def test_two_four_every_group_has_two_zeros(tiny, config):
    P.prune_(tiny, config, calibration=_calib())
    for lin in P.prunable_linears(tiny).values():
        groups = lin.weight.reshape(lin.out_features, -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()
        assert P.is_nm_sparse(lin.weight, 2, 4)


def test_wanda_uses_activations_not_only_weights(tiny):
    """Wanda and magnitude choose different weights once inputs are uneven."""
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    P.prune_(a, P.MagnitudeConfig(0.5))
    P.prune_(b, P.WandaConfig(0.5, sequential=False), calibration=_calib())
    wa, wb = a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wa == 0, wb == 0)


def test_precomputed_norms_match_one_shot(tiny):
    calib = _calib()
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    P.prune_(a, P.WandaConfig(0.4, sequential=False), calibration=calib)
    P.prune_(b, P.WandaConfig(0.4), norms=P.input_norms(b, calib))
    for (n, la), lb in zip(P.prunable_linears(a).items(), P.prunable_linears(b).values()):
        assert torch.equal(la.weight, lb.weight), n


def test_wanda_sequential_matches_reference_on_first_block(tiny):
    """Block 0 sees the same inputs in both modes, so its masks must agree."""
    calib = _calib()
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    P.prune_(a, P.WandaConfig(0.5, sequential=True), calibration=calib)
    P.prune_(b, P.WandaConfig(0.5, sequential=False), calibration=calib)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)


def test_exclude_patterns(tiny):
    P.prune_(tiny, P.MagnitudeConfig(0.5, exclude=("lm_head", "*embed*", "*self_attn*")))
    assert (tiny.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (tiny.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5


# ---------------------------------------------------------------- stats and storage

def test_sparsity_stats_counts_and_compression(tiny):
    before = P.sparsity_stats(tiny)
    assert before["linear"]["sparsity"] == 0
    assert before["linear"]["compression_csr"] < 1  # sparse storage of a dense matrix costs more
    P.prune_(tiny, P.MagnitudeConfig(0.5))
    s = P.sparsity_stats(tiny)
    assert set(s["layers"]) == set(P.prunable_linears(tiny))
    assert all(v["sparsity"] == 0.5 for v in s["layers"].values())
    assert s["linear"]["sparsity"] == 0.5
    n = s["linear"]["numel"]
    assert s["linear"]["bytes_dense"] == 4 * n
    assert s["linear"]["bytes_bitmask"] == pytest.approx(2 * n + n / 8, rel=0.01)
    # fp32 + int64 indices at 50 %: 6 bytes per weight > 4 -> CSR is larger than dense
    assert s["linear"]["compression_csr"] < 1 < s["linear"]["compression_bitmask"]
    assert s["model"]["numel"] == sum(p.numel() for p in tiny.parameters())
    assert s["model"]["sparsity"] < 0.5  # embedding and norms stay dense


def test_sparse_bytes_formulas():
    assert P.sparse_bytes(100, 50, 10, 4, "dense") == 400
    assert P.sparse_bytes(100, 50, 10, 4, "csr") == 50 * 12 + 11 * 8
    assert P.sparse_bytes(100, 50, 10, 4, "csr_int32") == 50 * 8 + 11 * 4
    assert P.sparse_bytes(100, 50, 10, 4, "bitmask") == 200 + 13
    with pytest.raises(ValueError, match="fmt"):
        P.sparse_bytes(1, 1, 1, 4, "coo")


def test_save_sparse_roundtrip_and_smaller(tiny, tmp_path):
    P.prune_(tiny, P.MagnitudeConfig(0.5))
    x = _calib()[0]
    nbytes = P.save_sparse(tiny, tmp_path / "sparse")
    dense_bytes = P.save_dense_bytes(tiny)
    stats = P.sparsity_stats(tiny)
    assert nbytes < dense_bytes
    # the file is the predicted bitmask bytes plus the safetensors header (JSON, a few KB)
    assert 0 <= nbytes - stats["model"]["bytes_bitmask"] < 16_000
    back = P.load_sparse(tmp_path / "sparse")
    with torch.no_grad():
        assert torch.equal(back(x).logits, tiny(x).logits)


def test_load_sparse_rejects_other_files(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="save_sparse"):
        P.load_sparse(tmp_path)


def test_csr_linear_matches_dense(tiny):
    P.prune_(tiny, P.MagnitudeConfig(0.5))
    x = _calib()[0]
    n = len(P.prunable_linears(tiny))
    with torch.no_grad():
        want = tiny(x).logits
        assert P.to_sparse_csr_(tiny) == n
        assert isinstance(tiny.model.layers[0].mlp.up_proj, P.CSRLinear)
        got = tiny(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_semi_structured_speed_on_this_device():
    r = P.semi_structured_speed(256, 128, 64, repeats=2)
    assert r["dense_s"] > 0 and r["sparse_24_s"] > 0 and r["speedup_24"] > 0
    if not torch.cuda.is_available():
        assert "no 2:4 sparse kernel on the CPU" in r["kernel"]
        assert "csr_s" in r


def test_to_semi_structured_needs_cuda(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the gpu test")
    with pytest.raises(RuntimeError, match="CUDA"):
        P.to_semi_structured_(tiny)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs CUDA sm80+")
def test_semi_structured_cuda_matches_and_speed():
    lin = nn.Linear(1024, 2048, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(P.nm_mask(lin.weight.abs().float(), 2, 4).half())
    x = torch.randn(128, 1024, device="cuda", dtype=torch.float16)
    want = lin(x)
    model = nn.Sequential(lin)
    assert P.to_semi_structured_(model) == 1
    torch.testing.assert_close(model(x), want, atol=1e-2, rtol=1e-2)
    r = P.semi_structured_speed(4096, 4096, 4096, repeats=10)
    assert r["speedup_24"] > 0


# ---------------------------------------------------------------- structured pruning

def _param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", P.IMPORTANCE_METHODS)
def test_importance_shapes_and_methods_differ(method):
    model = _gqa_tiny()
    s = P.importance(model, method, _calib(vocab=128))
    assert s["heads"].shape == (4, 9) and s["kv_groups"].shape == (4, 3) and s["channels"].shape == (4, 64)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())


def test_importance_l2_norm_and_magnitude_by_hand():
    model = _gqa_tiny()
    blk = model.model.layers[1]
    j = 5
    w = [t.detach() for t in (blk.mlp.gate_proj.weight[j], blk.mlp.up_proj.weight[j], blk.mlp.down_proj.weight[:, j])]
    l2 = P.importance(model, "l2_norm")["channels"][1, j]
    mag = P.importance(model, "magnitude")["channels"][1, j]
    assert l2.item() == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in w)), rel=1e-5)
    assert mag.item() == pytest.approx(sum(float(t.abs().sum()) for t in w) / sum(t.numel() for t in w), rel=1e-5)


def test_taylor_is_first_order_loss_change():
    """|grad . w| of a channel predicts the loss change when that channel is zeroed (to first order)."""
    model = _gqa_tiny()
    calib = _calib(vocab=128)
    s = P.importance(model, "taylor", calib)["channels"]
    # recompute by hand for one channel
    for p in model.parameters():
        p.grad = None
    loss = sum(model(b, labels=b).loss for b in calib) / len(calib)
    loss.backward()
    blk = model.model.layers[2].mlp
    j = 7
    by_hand = (blk.gate_proj.weight.grad[j] * blk.gate_proj.weight[j]).sum() + \
        (blk.up_proj.weight.grad[j] * blk.up_proj.weight[j]).sum() + \
        (blk.down_proj.weight.grad[:, j] * blk.down_proj.weight[:, j]).sum()
    assert s[2, j].item() == pytest.approx(abs(by_hand.item()), rel=1e-3, abs=1e-7)
    # and the model's own gradients/flags were restored by importance()
    assert all(p.requires_grad for p in model.parameters())


def test_activation_importance_by_hand():
    model = _gqa_tiny()
    calib = _calib(vocab=128)
    s = P.importance(model, "activation", calib)
    captured = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    with torch.no_grad():
        for b in calib:
            model(b)
    h.remove()
    acts = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])  # (tokens, I)
    torch.testing.assert_close(s["channels"][0], acts.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_block_influence_identity_block_scores_zero():
    model = _gqa_tiny()
    blk = model.model.layers[2]
    with torch.no_grad():  # a block whose residual branches output zero changes nothing
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    bi = P.block_influence(model, _calib(vocab=128))
    assert bi.shape == (4,)
    assert bi[2].item() == pytest.approx(0.0, abs=1e-6)
    assert (bi[[0, 1, 3]] > 1e-4).all()
    pruned = P.prune_layers(model, 0.75, _calib(vocab=128))
    assert pruned.config.num_hidden_layers == 3
    # the identity block was the one removed: outputs are unchanged
    x = _calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


def test_prune_heads_within_groups_keeps_gqa_consistent():
    model = _gqa_tiny()
    small = P.prune_heads(model, 2 / 3, method="l2_norm")
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (6, 3, 8)
    assert c.num_attention_heads % c.num_key_value_heads == 0
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (48, 72) and attn.k_proj.weight.shape == (24, 72)
    assert attn.o_proj.weight.shape == (72, 48)
    assert _param_count(small) == P.config_parameter_count(c)
    assert _param_count(model) == P.config_parameter_count(model.config)
    small(_calib(vocab=128)[0])  # runs
    assert model.config.num_attention_heads == 9  # input untouched


def test_prune_kv_groups_removes_whole_groups():
    model = _gqa_tiny()
    small = P.prune_heads(model, 2 / 3, granularity="kv_group")
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (6, 2)
    assert _param_count(small) == P.config_parameter_count(c)


def test_removing_zero_heads_is_exact():
    """If the pruned heads contribute nothing (o_proj columns zero), logits are unchanged."""
    model = _gqa_tiny()
    d = 8
    with torch.no_grad():
        for blk in model.model.layers:  # head 1 of every group contributes nothing
            for h in (1, 4, 7):
                blk.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    small = P.prune_heads(model, 2 / 3, method="l2_norm")
    x = _calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


def test_removing_dead_channels_is_exact():
    model = _gqa_tiny()
    with torch.no_grad():
        for blk in model.model.layers:
            blk.mlp.down_proj.weight[:, 32:] = 0  # channels 32.. are dead
    small = P.prune_channels(model, 0.5, method="magnitude")
    assert small.config.intermediate_size == 32
    x = _calib(vocab=128)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", P.IMPORTANCE_METHODS)
def test_structured_save_reload_identical(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _gqa_tiny()
    cfg = P.StructuredConfig(heads_keep=2 / 3, head_granularity="kv_group", channels_keep=0.75,
                             layers_keep=0.75, method=method)
    small = P.prune_structured(model, cfg, calibration=_calib(vocab=128))
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.intermediate_size == 48 and back.config.num_key_value_heads == 2
    assert _param_count(back) == P.config_parameter_count(back.config) == _param_count(small)
    x = _calib(vocab=128)[0]
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(x).logits)


def _sharp_teacher():
    """A tiny teacher with peaked next-token distributions (a random one is nearly uniform)."""
    teacher = _gqa_tiny()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    return teacher


@pytest.mark.parametrize("use_trainer", [True, False])
def test_heal_moves_pruned_model_toward_teacher(use_trainer):
    teacher = _sharp_teacher()
    student = P.prune_channels(_gqa_tiny(seed=1), 0.5)  # far from the teacher: a different init
    windows = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(1))
    before = P.kl_to_teacher(student, teacher, windows)
    losses = P.heal(student, teacher, windows, steps=25, batch_size=8, lr=3e-3, progress=False,
                    bf16=False, use_trainer=use_trainer)
    after = P.kl_to_teacher(student, teacher, windows)
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    assert after < 0.8 * before, (before, after)
    assert not student.training


def test_heal_rejects_bad_input():
    teacher = _gqa_tiny()
    with pytest.raises(ValueError, match="steps"):
        P.heal(teacher, teacher, torch.zeros(4, 8, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="windows"):
        P.heal(teacher, teacher, torch.zeros(8, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="teacher"):
        P.heal(teacher, None, torch.zeros(4, 8, dtype=torch.long), steps=1)


# ---------------------------------------------------------------- the real teacher

@pytest.mark.teacher
def test_teacher_structured_prune_saves_reloads(teacher, tmp_path):
    """Acceptance: 25 % of MLP channels and a third of the KV groups removed; save, reload, same logits."""
    from transformers import AutoModelForCausalLM

    model, tok = teacher
    small = P.prune_structured(model, P.StructuredConfig(heads_keep=2 / 3, head_granularity="kv_group",
                                                         channels_keep=0.75, method="l2_norm"))
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (6, 2, 64, 1152)
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    n = _param_count(back)
    assert n == P.config_parameter_count(back.config) == _param_count(small)
    assert n < _param_count(model)
    x = tok("def prune(model):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(back(x).logits, small(x).logits)


@pytest.mark.teacher
def test_teacher_wanda_beats_magnitude_at_50(teacher):
    """Acceptance: Wanda's test perplexity at 50 % is below magnitude's on the teacher."""
    model, tok = teacher
    test = dl.corpus_windows("pydoc", "test", tok, 128, max_windows=6)
    train = dl.corpus_windows("pydoc", "train", tok, 128)
    calib = dl.calibration_batches(train, 4, 4)
    norms = P.input_norms(model, calib)
    ppl = {}
    for name, cfg in (("magnitude", P.MagnitudeConfig(0.5)), ("wanda", P.WandaConfig(0.5))):
        m = copy.deepcopy(model)
        P.prune_(m, cfg, norms=norms)
        stats = P.sparsity_stats(m)
        assert all(v["sparsity"] == 0.5 for v in stats["layers"].values())
        ppl[name] = dl.perplexity(m, test, bf16=True, progress=False)
        del m
    assert ppl["wanda"] < ppl["magnitude"], ppl


# ---------------------------------------------------------------- the notebook's view, plot and widget

def _fake_curves():
    return {"sparsities": [0.0, 0.3, 0.5], "magnitude": [10.0, 14.0, 90.0], "wanda": [10.0, 12.0, 20.0],
            "dense": 10.0}


def test_sparsity_curve_view_and_errors():
    v = P.sparsity_curve_view(_fake_curves(), 0.5, "wanda")
    assert v["ppl"] == 20.0 and v["other_ppl"] == 90.0 and v["ratio_to_dense"] == 2.0
    with pytest.raises(ValueError, match="sparsity"):
        P.sparsity_curve_view(_fake_curves(), 0.4)
    with pytest.raises(ValueError, match="method"):
        P.sparsity_curve_view(_fake_curves(), 0.5, "taylor")


def test_sparsity_curve_on_tiny(tiny):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    curves = P.sparsity_curve(tiny, windows, _calib(), sparsities=(0.5,), progress=False, bf16=False)
    assert curves["sparsities"] == [0.0, 0.5] and len(curves["wanda"]) == len(curves["magnitude"]) == 2
    assert curves["wanda"][0] == curves["dense"]
    assert (tiny.model.layers[0].mlp.up_proj.weight != 0).all()  # the input model is untouched


def test_sparsity_widget_redraws():
    import matplotlib.pyplot as plt

    from distill_lab.widgets import sparsity_widget

    w = sparsity_widget(_fake_curves())
    assert w.result["ppl"] == 20.0
    w.children[1].value = "magnitude"
    assert w.result["ppl"] == 90.0
    w.children[0].value = 0.3
    assert w.result["ppl"] == 14.0
    plt.close("all")


def test_exercise_checks_accept_references_and_reject_wrong():
    from distill_lab.exercises import pruning as ex

    assert ex.check_magnitude_mask(lambda w, s: P.unstructured_mask(w.abs(), s, "row"))
    assert ex.check_wanda_scores(lambda w, x: P.wanda_scores(w, x.norm(dim=0)))
    assert ex.check_nm_mask(lambda s: P.nm_mask(s, 2, 4))

    def todo(*args):
        raise NotImplementedError

    assert ex.check_magnitude_mask(todo) is False
    with pytest.raises(AssertionError):
        ex.check_magnitude_mask(lambda w, s: P.unstructured_mask(w, s, "row"))  # forgot abs()
    with pytest.raises(AssertionError):
        ex.check_wanda_scores(lambda w, x: w.abs() * x.abs().mean(0))
