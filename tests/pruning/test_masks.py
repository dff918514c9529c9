"""Tests for distill_lab.pruning.masks: keep-masks and scores of one weight matrix."""

import pytest
import torch

from distill_lab.pruning import masks as M


def test_unstructured_mask_exact_per_row_and_per_layer():
    scores = torch.rand(7, 40)
    row = M.unstructured_mask(scores, 0.3, "row")
    assert ((~row).sum(1) == 12).all()  # floor(0.3 * 40)
    layer = M.unstructured_mask(scores, 0.3, "layer")
    assert (~layer).sum() == int(0.3 * 280)
    # the pruned entries are the lowest scores of each row
    for r in range(7):
        assert scores[r][~row[r]].max() <= scores[r][row[r]].min()


def test_unstructured_mask_ties_keep_exact_count():
    scores = torch.zeros(3, 10)  # all tied
    assert ((~M.unstructured_mask(scores, 0.5)).sum(1) == 5).all()


def test_unstructured_mask_rejects_bad_sparsity_and_granularity():
    with pytest.raises(ValueError, match="sparsity"):
        M.unstructured_mask(torch.rand(2, 4), 1.0)
    with pytest.raises(ValueError, match="granularity='column'"):
        M.unstructured_mask(torch.rand(2, 4), 0.5, "column")


def test_nm_mask_keeps_n_largest_per_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    mask = M.nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of m=4"):
        M.nm_mask(torch.rand(2, 6))


def test_is_nm_sparse():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    assert M.is_nm_sparse(w, 2, 4)
    assert not M.is_nm_sparse(torch.ones(2, 4), 2, 4)
    assert not M.is_nm_sparse(torch.zeros(2, 6), 2, 4)  # 6 inputs do not split into groups of 4


def test_parse_pattern():
    assert M.parse_pattern("unstructured") is None
    assert M.parse_pattern("2:4") == (2, 4)
    with pytest.raises(ValueError, match="pattern='2-4'"):
        M.parse_pattern("2-4")
    with pytest.raises(ValueError, match="0 < N < M"):
        M.parse_pattern("4:2")


def test_wanda_scores_weight_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([10.0, 1.0])
    assert torch.equal(M.wanda_scores(w, norms), torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    # with a large input norm, a small weight outranks a large one: the point of Wanda
    mask = M.unstructured_mask(M.wanda_scores(w, norms), 0.5)
    assert mask.tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="input_norm has shape"):
        M.wanda_scores(w, torch.ones(3))


def test_exercise_checks_accept_references_and_reject_wrong():
    from distill_lab.exercises import pruning as ex

    assert ex.check_magnitude_mask(lambda w, s: M.unstructured_mask(w.abs(), s, "row"))
    assert ex.check_wanda_scores(lambda w, x: M.wanda_scores(w, x.norm(dim=0)))
    assert ex.check_nm_mask(lambda s: M.nm_mask(s, 2, 4))

    def todo(*args):
        raise NotImplementedError

    assert ex.check_magnitude_mask(todo) is False
    with pytest.raises(AssertionError):
        ex.check_magnitude_mask(lambda w, s: M.unstructured_mask(w, s, "row"))  # forgot abs()
    with pytest.raises(AssertionError):
        ex.check_wanda_scores(lambda w, x: w.abs() * x.abs().mean(0))
