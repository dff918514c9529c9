"""Tests for distill_lab.pruning.sparse_storage: storage formats, the sparse file, CSR and 2:4 layers."""

import pytest
import torch
from torch import nn

from distill_lab.pruning import selection as S
from distill_lab.pruning import sparse_storage as SS
from distill_lab.pruning.masks import nm_mask
from distill_lab.pruning.selection import prunable_linears
from distill_lab.pruning.unstructured import MagnitudeConfig, prune_
from distill_lab.serialization import weights_bytes


def test_sparsity_stats_counts_and_compression(tiny):
    before = SS.sparsity_stats(tiny)
    assert before["linear"]["sparsity"] == 0
    assert before["linear"]["compression_csr"] < 1  # sparse storage of a dense matrix costs more
    prune_(tiny, MagnitudeConfig(0.5))
    s = SS.sparsity_stats(tiny)
    assert set(s["layers"]) == set(prunable_linears(tiny))
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
    assert SS.sparse_bytes(100, 50, 10, 4, "dense") == 400
    assert SS.sparse_bytes(100, 50, 10, 4, "csr") == 50 * 12 + 11 * 8
    assert SS.sparse_bytes(100, 50, 10, 4, "csr_int32") == 50 * 8 + 11 * 4
    assert SS.sparse_bytes(100, 50, 10, 4, "bitmask") == 200 + 13
    with pytest.raises(ValueError, match="fmt"):
        SS.sparse_bytes(1, 1, 1, 4, "coo")


def test_save_sparse_roundtrip_and_smaller(tiny, calib, tmp_path):
    prune_(tiny, MagnitudeConfig(0.5))
    x = calib()[0]
    nbytes = SS.save_sparse(tiny, tmp_path / "sparse")
    dense_bytes = weights_bytes(tiny)
    stats = SS.sparsity_stats(tiny)
    assert nbytes < dense_bytes
    # the file is the predicted bitmask bytes plus the safetensors header (JSON, a few KB)
    assert 0 <= nbytes - stats["model"]["bytes_bitmask"] < 16_000
    assert SS.sparse_bytes_on_disk(tiny) == nbytes
    back = SS.load_sparse(tmp_path / "sparse")
    with torch.no_grad():
        assert torch.equal(back(x).logits, tiny(x).logits)


def test_save_sparse_filter_fn(tiny, tmp_path):
    prune_(tiny, MagnitudeConfig(0.5))
    everything = SS.save_sparse(tiny, tmp_path / "all")
    mlp_only = SS.save_sparse(tiny, tmp_path / "mlp", filter_fn=lambda module, name: ".mlp." in name)
    assert mlp_only > everything  # the attention weights are stored dense
    globs = S.exclude_globs(("lm_head", "*embed*", "*self_attn*"))
    assert SS.sparse_bytes_on_disk(tiny, globs) == mlp_only
    assert SS.sparsity_stats(tiny, globs) == SS.sparsity_stats(tiny, lambda module, name: ".mlp." in name)
    with pytest.raises(TypeError, match="exclude"):  # one name for layer selection: filter_fn
        SS.sparsity_stats(tiny, exclude=("lm_head",))


def test_save_sparse_stores_a_tied_weight_once(tiny, tmp_path):
    from safetensors import safe_open

    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    SS.save_sparse(tiny, tmp_path / "s")
    with safe_open(str(tmp_path / "s" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_load_sparse_rejects_other_files(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="save_sparse"):
        SS.load_sparse(tmp_path)


def test_csr_linear_matches_dense(tiny, calib):
    prune_(tiny, MagnitudeConfig(0.5))
    x = calib()[0]
    n = len(prunable_linears(tiny))
    with torch.no_grad():
        want = tiny(x).logits
        assert len(SS.to_sparse_csr_(tiny)) == n
        assert isinstance(tiny.model.layers[0].mlp.up_proj, SS.CSRLinear)
        got = tiny(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_to_sparse_csr_only_selected_and_sparse_layers(tiny):
    prune_(tiny, MagnitudeConfig(0.5), filter_fn=lambda module, name: ".mlp." in name)
    assert len(SS.to_sparse_csr_(tiny)) == 3 * len(tiny.model.layers)  # dense attention weights stay Linear
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, nn.Linear)


def test_to_semi_structured_needs_cuda(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the gpu test")
    ok, why = SS.semi_structured_available()
    assert not ok and "CPU" in why
    with pytest.raises(RuntimeError, match="CUDA"):
        SS.to_semi_structured_(tiny)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs CUDA sm80+")
def test_semi_structured_cuda_matches_and_speed():
    from distill_lab.speed.pruning import semi_structured_speed

    lin = nn.Linear(1024, 2048, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs().float(), 2, 4).half())
    x = torch.randn(128, 1024, device="cuda", dtype=torch.float16)
    want = lin(x)
    model = nn.Sequential(lin)
    assert len(SS.to_semi_structured_(model)) == 1
    torch.testing.assert_close(model(x), want, atol=1e-2, rtol=1e-2)
    r = semi_structured_speed(4096, 4096, 4096, repeats=10)
    assert r["speedup_24"] > 0
