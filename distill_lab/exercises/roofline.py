"""Algorithm lab of notebook 00: the memory roofline of decode, and Amdahl's law from a profiler table.

At batch 1 a decode step reads every weight once (the tied embedding once, as the output head) plus the
whole KV cache so far, and does about two flops per weight: far too little arithmetic to keep a CPU busy,
so memory bandwidth sets the pace. The learner writes

* ``decode_bytes(config, context, weight_bytes, kv_bytes)``: bytes read to produce one token after
  ``context`` tokens: every weight the config implies (attention, MLP, norms, the embedding, and the
  output head unless it is tied to the embedding), plus the keys and values of every layer and KV head;
* ``amdahl(share, speedup)``: the whole step's speed-up when only ``share`` of its time gets ``speedup``
  times faster: ``1 / ((1 - share) + share / speedup)``.

:func:`roofline_lab` measures this machine's bandwidth and the teacher's decode profile
(``speed.roofline``) and turns them into predictions beside the measured decode speed.
"""

from __future__ import annotations

from transformers import LlamaConfig

from ._check import check, label_of, yours_or_reference
from ._package import decode_time_shares, memory_bandwidth, parameter_count

__all__ = ["amdahl_reference", "check_amdahl", "check_decode_bytes", "decode_bytes_reference", "roofline_lab"]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decode_bytes_reference(config, context: int, weight_bytes: int = 4, kv_bytes: int = 4) -> int:
    """Every parameter once (``arch.parameter_count``: a tied head is the embedding), plus the KV cache so far."""
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * _head_dim(config) * kv_bytes * context
    return parameter_count(config) * weight_bytes + kv


def _bytes_variant(kv_factor=2, heads="kv", no_cache=False, tied_twice=False, two_mlp=False):
    """A wrong byte count (the cache, its factor 2, query heads, the tied head twice, two MLP matrices)."""
    def wrong(config, context, weight_bytes=4, kv_bytes=4):
        h, d, i, L = config.hidden_size, _head_dim(config), config.intermediate_size, config.num_hidden_layers
        q, kv_h = config.num_attention_heads, config.num_key_value_heads
        block = h * q * d * 2 + h * kv_h * d * 2 + (2 if two_mlp else 3) * h * i + 2 * h
        tied = getattr(config, "tie_word_embeddings", False)
        params = L * block + h + config.vocab_size * h * (2 if tied_twice or not tied else 1)
        n_heads = kv_h if heads == "kv" else q
        cache = 0 if no_cache else kv_factor * L * n_heads * d * kv_bytes * context
        return params * weight_bytes + cache
    return wrong


def _config(**kw) -> LlamaConfig:
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


def check_decode_bytes(fn, config=None) -> bool:
    """Check ``fn(config, context, weight_bytes, kv_bytes) -> bytes``; ``config``: the teacher's, as more cases."""
    cases = [(_config(), 16, 4, 4), (_config(num_key_value_heads=4, head_dim=16), 1, 2, 2),
             (_config(tie_word_embeddings=False, num_hidden_layers=3), 300, 4, 4), (_config(), 0, 1, 4)]
    labels = [None] * len(cases)
    if config is not None:
        cases += [(config, 32, 4, 4), (config, 2048, 2, 2)]
        labels += ["the teacher's config, 32 tokens of context, fp32", "the teacher's config, 2048 tokens, bf16"]
    mistakes = [("the KV cache is missing: every step also reads the keys and values of all earlier positions",
                 _bytes_variant(no_cache=True)),
                ("keys only: the cache holds keys *and* values (a factor of 2)", _bytes_variant(kv_factor=1)),
                ("query heads instead of KV heads: under grouped-query attention only num_key_value_heads are "
                 "cached", _bytes_variant(heads="q")),
                ("the tied head counted twice: with tie_word_embeddings the output head *is* the embedding, "
                 "read once", _bytes_variant(tied_twice=True)),
                ("two MLP matrices: a SwiGLU MLP has gate_proj, up_proj and down_proj", _bytes_variant(two_mlp=True))]
    return check("decode bytes per token", fn, decode_bytes_reference, cases, atol=0.5, rtol=0, labels=labels,
                 mistakes=mistakes)


def amdahl_reference(share: float, speedup: float) -> float:
    """Overall speed-up when ``share`` of the time runs ``speedup`` times faster and the rest is unchanged."""
    return 1.0 / ((1.0 - share) + share / speedup)


def check_amdahl(fn) -> bool:
    """Check ``fn(share, speedup) -> overall speed-up`` (Amdahl's law)."""
    cases = [(0.5, 2.0), (0.9, 10.0), (0.72, 7.8), (0.0, 5.0), (1.0, 3.0), (0.3, 0.5)]
    mistakes = [("the speed-up applied to the whole step: only the share that got faster shrinks, the rest takes "
                 "as long as before", lambda f, s: s),
                ("speed-ups do not add: compute the new time, (1 - share) + share / speedup, then invert it",
                 lambda f, s: (1 - f) + f * s),
                ("the time, not the speed-up: the new time is (1 - share) + share / speedup; the speed-up is "
                 "1 over it", lambda f, s: (1 - f) + f / s)]
    return check("Amdahl's law", fn, amdahl_reference, cases, atol=1e-9, rtol=1e-9, mistakes=mistakes)


def roofline_lab(model, measured_tokens_per_s: float, decode_bytes, amdahl, kernel_speedup: float,
                 context: int = 32) -> dict:
    """Predict the teacher's decode speed from this machine's bandwidth, and a kernel's effect on the whole step.

    ``measured_tokens_per_s``: the lesson's measured fp32 decode; ``kernel_speedup``: how much faster a
    matmul kernel is on one Linear (e.g. lesson 02's int4 decode kernel over fp32). Returns the bandwidth
    (bytes/s), the bytes per token, the roofline tokens/s, the measured share of the roofline, the decode
    profile's matmul share and Amdahl's prediction for the model, for the learner's functions and the
    package's (``"package"``), and who wrote them (``"by"``).
    """
    bytes_fn = yours_or_reference(decode_bytes, decode_bytes_reference, "my_decode_bytes")
    amdahl_fn = yours_or_reference(amdahl, amdahl_reference, "my_amdahl")
    bandwidth = memory_bandwidth()
    shares = decode_time_shares(model)
    per_token = float(bytes_fn(model.config, context, 4, 4))
    out = {"bandwidth": bandwidth, "bytes_per_token": per_token, "roofline_tokens_per_s": bandwidth / per_token,
           "matmul_share": shares["matmul_share"], "profile_rows": shares["rows"],
           "model_speedup": float(amdahl_fn(shares["matmul_share"], kernel_speedup))}
    out["measured_share_of_roofline"] = measured_tokens_per_s / out["roofline_tokens_per_s"]
    ref_bytes = decode_bytes_reference(model.config, context, 4, 4)
    out["package"] = {"bytes_per_token": ref_bytes, "roofline_tokens_per_s": bandwidth / ref_bytes,
                      "model_speedup": amdahl_reference(shares["matmul_share"], kernel_speedup)}
    out["by"] = label_of(bytes_fn, amdahl_fn)
    return out
