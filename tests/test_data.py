import pytest
import torch

from distill_lab import data


def test_pydoc_splits_are_deterministic_and_disjoint():
    docs = data.corpus_documents("pydoc")
    splits = {s: data.load_corpus("pydoc", s) for s in data.SPLITS}
    assert data.load_corpus("pydoc", "test") == splits["test"]
    assert sum(len(t) for t in docs.values()) > 400_000
    sizes = {s: len(t) for s, t in splits.items()}
    assert sizes["train"] > 5 * sizes["test"] > 0 and sizes["validation"] > 0
    test_keys = {k for k in docs if data._split_of(k) == "test"}
    train_keys = {k for k in docs if data._split_of(k) == "train"}
    assert test_keys and not test_keys & train_keys


def test_stdlib_code_corpus_is_python_source():
    text = data.load_corpus("stdlib-code", "test")
    assert "def " in text and "import " in text and len(text) > 50_000


@pytest.mark.parametrize("name,split,match", [("wiki", "train", "unknown corpus 'wiki'"),
                                              ("pydoc", "dev", "unknown split 'dev'.*train, validation, test")])
def test_bad_corpus_or_split(name, split, match):
    with pytest.raises(ValueError, match=match):
        data.load_corpus(name, split)


def test_token_windows_shapes_and_stride():
    ids = torch.arange(100)
    w = data.token_windows(ids, 10)
    assert w.shape == (10, 10) and torch.equal(w[1], torch.arange(10, 20))
    s = data.token_windows(ids, 10, stride=5, max_windows=3)
    assert s.shape == (3, 10) and torch.equal(s[1], torch.arange(5, 15))


def test_window_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match=r"window=9000 .*context \(8192 tokens\).*2 <= window <= 8192"):
        data.token_windows(torch.arange(10_000), 9000, max_context=8192)
    with pytest.raises(ValueError, match="stride=20"):
        data.token_windows(torch.arange(100), 10, stride=20)


def test_calibration_batches_are_seeded():
    windows = torch.arange(200).view(20, 10)
    a = data.calibration_batches(windows, 8, 3, seed=1)
    b = data.calibration_batches(windows, 8, 3, seed=1)
    assert [t.shape[0] for t in a] == [3, 3, 2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="n_windows=30"):
        data.calibration_batches(windows, 30, 4)
