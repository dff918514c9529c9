import json
import math

import pytest
import torch
import torch.nn.functional as F

import distill_lab as dl
from distill_lab import evaluate
from distill_lab.evaluate import cost


def test_perplexity_matches_model_loss(tiny):
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    ppl = dl.perplexity(tiny, windows, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [tiny(w[None], labels=w[None]).loss for w in windows]
    assert ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert ppl > 200  # an untrained model over 256 tokens is close to uniform


def test_context_scores_only_the_tail(tiny):
    windows = torch.randint(0, 256, (2, 10))
    total, count = evaluate.token_nll(tiny, windows, context=6, progress=False)
    assert count == 2 * 3
    logits = tiny(windows).logits[:, 6:-1]
    ref = F.cross_entropy(logits.reshape(-1, 256), windows[:, 7:].reshape(-1), reduction="sum")
    assert total == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="context=9"):
        evaluate.token_nll(tiny, windows, context=9)


def test_bf16_perplexity_close_to_fp32(tiny):
    windows = torch.randint(0, 256, (4, 16))
    a = dl.perplexity(tiny, windows, progress=False)
    b = dl.perplexity(tiny, windows, bf16=True, progress=False)
    assert b == pytest.approx(a, rel=0.05)


def test_latency_reports_positive_rates(tiny):
    r = dl.latency(tiny, batch=2, seq=8, decode_tokens=3, repeats=2)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["decode_ms_per_token"] == pytest.approx(1000 / r["decode_tokens_per_s"])


def test_bytes_in_memory_and_on_disk(tiny):
    n = dl.parameter_count(tiny)
    mem = dl.memory_bytes(tiny)
    assert mem >= 4 * n
    disk = dl.weights_bytes(tiny)
    assert abs(disk - mem) < 0.05 * mem + 4096


def _touch(mib: int) -> None:
    """Map ``mib`` MiB of fresh anonymous memory, write every page, unmap it.

    Not a torch tensor: after earlier tests the allocator may hand back pages that are already
    resident (then RSS rightly does not move, and the check would test the allocator's state).
    """
    import mmap

    m = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(m), mmap.PAGESIZE):
        m[offset] = 1
    m.close()


def test_peak_memory_sees_an_allocation_and_forgets_earlier_peaks():
    if not cost._reset_rss_peak():
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    _touch(384)  # an earlier, larger peak that a reset must forget
    _, idle = dl.peak_memory(lambda: None)
    _, peak = dl.peak_memory(lambda: _touch(256))
    assert peak - idle >= 200 * 2**20, f"a 256 MiB tensor raised the measured peak by {(peak - idle) / 2**20:.0f} MiB"
    _, again = dl.peak_memory(lambda: None)
    assert again < peak - 200 * 2**20, "the high-water mark was not reset: an old peak leaked into a new measurement"


def test_result_roundtrip_and_record(tmp_path, monkeypatch):
    r = dl.Result("unit", {"ppl": 12.5}, profile="smoke", seed=3)
    assert {"torch", "transformers", "device", "git_commit"} <= set(r.env)
    path = r.save(tmp_path / "r.json")
    assert dl.Result.load(path).metrics == {"ppl": 12.5}
    monkeypatch.delenv(evaluate.REPORT_ENV, raising=False)
    assert dl.record(r) is None
    monkeypatch.setenv(evaluate.REPORT_ENV, str(tmp_path))
    saved = dl.record(r)
    assert json.loads(saved.read_text())["seed"] == 3


def test_generate_samples_greedy_is_deterministic(tiny):
    class Tok:  # minimal tokenizer over the tiny vocabulary
        pad_token_id = 0

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return type("E", (), {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])})()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    a = dl.generate_samples(tiny, Tok(), ["hi"], max_new_tokens=5)
    assert a == dl.generate_samples(tiny, Tok(), ["hi"], max_new_tokens=5) and len(a[0]) == 5


def test_repeated_ngram_share_counts_loops_not_fresh_text():
    from distill_lab.evaluate import repeated_ngram_share
    assert repeated_ngram_share(list(range(40))) == 0.0  # never repeats
    loop = [7, 8, 9] * 10  # "the value of the value of ...": 27 4-grams, only 3 distinct
    assert repeated_ngram_share(loop) == pytest.approx(24 / 27)
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # (1,2,3,4) again
    assert repeated_ngram_share([1, 2, 3]) == 0.0  # too short to repeat a 4-gram
    assert repeated_ngram_share([5, 5, 5, 5, 5], n=1) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="n=0"):
        repeated_ngram_share([1, 2], n=0)
