"""Lab of notebook 04 (combined compression): the size Amdahl law, a size model of the saved file, the Pareto front.

The learner writes a size model (bytes of each part of a pruned, int4-quantized model); the lesson
checks it against the measured parts of the saved combined model (:func:`measured_parts` reads the
safetensors header), then uses it to choose a recipe under a size budget before running it
(:func:`pruned_config` gives the shape a recipe's prune step produces).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import torch

from ._check import allclose, check, yours_or_reference

__all__ = ["check_overall_reduction", "check_pareto_front", "check_size_model", "measured_parts",
           "overall_reduction_reference", "pareto_names", "pareto_reference", "PARTS", "predicted_parts",
           "pruned_config", "reduction_by_parts", "size_model_reference", "size_of_knobs"]

PARTS = ("embedding", "attention", "mlp", "norms")


def overall_reduction_reference(embedding_share: float, embedding_factor: float, block_factor: float) -> float:
    # the fp32 file is 1 = embedding_share + (1 - embedding_share); each part shrinks by its own factor
    return 1.0 / (embedding_share / embedding_factor + (1.0 - embedding_share) / block_factor)


def pareto_reference(sizes: torch.Tensor, ppls: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(len(sizes))
    for i in range(len(sizes)):
        no_worse = (sizes <= sizes[i]) & (ppls <= ppls[i])
        better = (sizes < sizes[i]) | (ppls < ppls[i])
        if bool((no_worse & better).any()):
            keep[i] = 0.0
    return keep


def check_overall_reduction(fn) -> bool:
    """Check ``fn(embedding_share, embedding_factor, block_factor)``: whole-model size reduction."""
    cases = [(0.21, 1.0, 8.0), (0.21, 4.0, 8.0), (0.21, 4.0, 1e6), (0.0, 4.0, 7.0), (0.5, 2.0, 2.0),
             (0.3, 3.9, 17.0)]
    mistakes = [("averaged the factors: sizes add, so add the shrunk parts, share / factor, and invert the sum",
                 lambda e, fe, fb: e * fe + (1 - e) * fb),
                ("forgot to invert: share / factor summed over the parts is the new size (a fraction of the old); "
                 "the reduction is 1 / that", lambda e, fe, fb: e / fe + (1 - e) / fb),
                ("ignored the embedding: it stays in the file and caps the reduction", lambda e, fe, fb: fb),
                ("multiplied the factors: each part shrinks by its own factor; they do not compound",
                 lambda e, fe, fb: fe * fb)]
    return check("overall size reduction", fn, overall_reduction_reference, cases, atol=1e-6, rtol=1e-6,
                 mistakes=mistakes)


def check_pareto_front(fn) -> bool:
    """Check ``fn(sizes, ppls)``: a 0/1 tensor marking the points no other point beats on both size and ppl."""
    g = torch.Generator().manual_seed(4)
    cases = [(torch.tensor([513.0, 130.0, 70.0, 260.0, 40.0]), torch.tensor([1.0, 1.02, 1.1, 1.6, 2.5])),
             (torch.tensor([10.0, 20.0, 30.0]), torch.tensor([3.0, 2.0, 1.0])),
             (torch.tensor([10.0, 20.0, 30.0]), torch.tensor([1.0, 2.0, 3.0])),
             (torch.tensor([5.0, 5.0, 6.0]), torch.tensor([2.0, 2.0, 1.0])),  # ties: neither beats the other
             (torch.rand(12, generator=g) * 500, 1 + torch.rand(12, generator=g))]

    def strict(sizes, ppls):  # "beaten" only when strictly better in both
        return torch.tensor([float(not bool(((sizes < sizes[i]) & (ppls < ppls[i])).any()))
                             for i in range(len(sizes))])

    mistakes = [("inverted: mark the points that nobody beats (1), not the beaten ones",
                 lambda s, p: 1 - pareto_reference(s, p)),
                ("only the best perplexity: a larger model is on the front only if it is better, but every point "
                 "that no other point beats on both axes belongs there", lambda s, p: (p <= p.min()).float()),
                ("ties: a point is beaten only by one at most as large and at most as bad, *and* strictly "
                 "better in one of the two; one better in both is not required", strict),
                ("ties: two identical points do not beat each other (one must be strictly better in one axis)",
                 lambda s, p: torch.tensor([float(not bool(((s <= s[i]) & (p <= p[i]) & (
                     torch.arange(len(s)) != i)).any())) for i in range(len(s))]))]
    return check("Pareto front", lambda s, p: torch.as_tensor(fn(s, p)).float(), pareto_reference, cases,
                 mistakes=[(h, (lambda v: lambda s, p: torch.as_tensor(v(s, p)).float())(v)) for h, v in mistakes])


# --------------------------------------------------------------------------------------- size model


def _dims(config):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.hidden_size, heads, config.num_key_value_heads, head_dim, config.intermediate_size,
            config.num_hidden_layers, config.vocab_size)


def size_model_reference(config, group_size: int = 64) -> dict:
    """Bytes of each part of the saved model: int4 g``group_size`` asymmetric blocks and embedding, fp32 norms.

    An int4 Linear (out, in) stores ``out·in/2`` bytes of packed codes plus a bf16 scale and a bf16
    zero per group of ``group_size`` inputs; the int4 embedding (vocab, hidden) is stored the same way,
    groups running along ``hidden`` (the tied output head is the same tensor, stored once).
    """
    d, h, kv, hd, inter, layers, vocab = _dims(config)

    def int4(out, inp):
        return out * inp // 2 + (inp // group_size) * out * 2 * 2

    return {"embedding": int4(vocab, d),
            "attention": layers * (int4(h * hd, d) + 2 * int4(kv * hd, d) + int4(d, h * hd)),
            "mlp": layers * (2 * int4(inter, d) + int4(d, inter)),
            "norms": 4 * d * (2 * layers + 1)}


def _size_variant(codes_per_weight=0.5, group_bytes=4, kv_like_q=False, embedding=None, norms=True, head_too=False):
    def wrong(config, group_size=64):
        d, h, kv, hd, inter, layers, vocab = _dims(config)

        def lin(out, inp):
            return int(out * inp * codes_per_weight) + (inp // group_size) * out * group_bytes

        kv_out = (h if kv_like_q else kv) * hd
        emb = embedding(vocab, d) if embedding is not None else lin(vocab, d)
        return {"embedding": 2 * emb if head_too else emb,
                "attention": layers * (lin(h * hd, d) + 2 * lin(kv_out, d) + lin(d, h * hd)),
                "mlp": layers * (2 * lin(inter, d) + lin(d, inter)),
                "norms": 4 * d * (2 * layers + 1) if norms else 0}
    return wrong


def _parts_compare(got, want, case):
    if not isinstance(got, dict) or set(got) != set(PARTS):
        return f"returned {type(got).__name__} {sorted(got) if isinstance(got, dict) else ''}; " \
               f"expected a dict with the keys {', '.join(PARTS)}"
    vec = lambda d: torch.tensor([float(d[k]) for k in PARTS], dtype=torch.float64)  # noqa: E731
    problem = allclose(vec(got), vec(want), atol=0.5, rtol=0)
    if problem is None:
        return None
    wrong = [k for k in PARTS if abs(float(got[k]) - float(want[k])) > 0.5]
    return f"wrong bytes for {', '.join(wrong)}: " + ", ".join(f"{k} {float(got[k]):,.0f} vs {want[k]:,}"
                                                            for k in wrong)


def _config(hidden, heads, kv, head_dim, inter, layers, vocab):
    return SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                           intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab)


def check_size_model(fn, config=None) -> bool:
    """Check ``fn(config, group_size) -> {"embedding", "attention", "mlp", "norms"}``: bytes of each saved part.

    The format is the combined recipe's: int4 asymmetric blocks and embedding (packed codes, bf16 scale and
    zero per group; the tied head stored once), fp32 norms. ``config``: a real (e.g. pruned) model config as
    one more case.
    """
    cases = [(_config(64, 4, 2, 16, 128, 2, 100), 64), (_config(128, 4, 2, 32, 256, 2, 100), 32),
             (_config(576, 6, 3, 64, 576, 24, 49152), 64),
             (_config(256, 8, 8, 32, 512, 3, 1000), 64)]
    labels = [None] * 4
    if config is not None:
        cases.append((config, 64))
        labels.append(f"the teacher's pruned config ({config.num_hidden_layers} layers, "
                      f"{config.num_attention_heads} heads, MLP {config.intermediate_size})")
    mistakes = [("forgot the group overhead: every group of group_size weights also stores a bf16 scale and a "
                 "bf16 zero (4 bytes)", _size_variant(group_bytes=0)),
                ("the zero is missing: an asymmetric group stores a scale and a zero, 2 bf16 values = 4 bytes",
                 _size_variant(group_bytes=2)),
                ("fp32 scales and zeros: they are stored in bf16, 2 bytes each", _size_variant(group_bytes=8)),
                ("4 bits is half a byte: the packed codes take out·in/2 bytes", _size_variant(codes_per_weight=4)),
                ("k_proj and v_proj have num_key_value_heads · head_dim outputs (grouped-query attention), "
                 "not num_attention_heads · head_dim", _size_variant(kv_like_q=True)),
                ("the output head is tied to the embedding: it is stored once",
                 _size_variant(head_too=True)),
                ("the embedding is int4 here too, stored like a Linear (vocab, hidden): packed codes plus a bf16 "
                 "scale and zero per group, not int8 with a scale per row",
                 _size_variant(embedding=lambda v, d: v * d + 4 * v)),
                ("the embedding is int4 here (half a byte per weight + a scale and zero per group), not fp32",
                 _size_variant(embedding=lambda v, d: 4 * v * d)),
                ("forgot the norms: two fp32 RMSNorm weights per block and one final norm",
                 _size_variant(norms=False))]
    return check("size model", fn, size_model_reference, cases, labels=labels, mistakes=mistakes,
                 compare=_parts_compare)


# ---------------------------------------------------------------------------------------- the lab

_DTYPE_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def _part_of(tensor_name: str) -> str:
    if "embed" in tensor_name or tensor_name.startswith("lm_head"):
        return "embedding"
    if "norm" in tensor_name:
        return "norms"
    if ".self_attn." in tensor_name:
        return "attention"
    if ".mlp." in tensor_name:
        return "mlp"
    return "other"


def measured_parts(folder: str | Path) -> dict:
    """Bytes of each part in a saved model's safetensors file(s), read from their headers.

    Returns ``{"embedding", "attention", "mlp", "norms", "other", "header", "file"}``: tensor bytes per
    part, the header bytes (names, shapes, metadata) and the whole file size.
    """
    out = dict.fromkeys((*PARTS, "other", "header", "file"), 0)
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out["header"] += 8 + n
        out["file"] += path.stat().st_size
        for name, info in header.items():
            if name != "__metadata__":
                start, stop = info["data_offsets"]
                out[_part_of(name)] += stop - start
    return out


def _n_keep(keep: float, total: int) -> int:
    return min(total, max(1, int(round(keep * total))))


def pruned_config(config, heads_keep: float = 1.0, channels_keep: float = 1.0, layers_keep: float = 1.0):
    """The shape a recipe's structured prune step gives ``config``: query heads kept in every KV group,
    MLP channels and blocks, each rounded to the nearest count (at least one)."""
    d, h, kv, hd, inter, layers, vocab = _dims(config)
    return _config(d, kv * _n_keep(heads_keep, h // kv), kv, hd, _n_keep(channels_keep, inter),
                   _n_keep(layers_keep, layers), vocab)


def predicted_parts(size_model, config, group_size: int = 64) -> dict:
    """Bytes per part of ``config`` by the learner's ``size_model``: ``{"parts", "total", "by"}``."""
    fn = yours_or_reference(size_model, size_model_reference, "my_size_model")
    parts = fn(config, group_size)
    return {"parts": parts, "total": sum(parts.values()), "by": fn.label}


def size_of_knobs(size_model, config, knobs: dict, group_size: int = 64) -> dict:
    """:func:`predicted_parts` of the shape a recipe's knobs give ``config`` (int4 recipes only)."""
    if not str(knobs.get("quantize", "")).startswith("int4") or knobs.get("embedding_bits", 4) != 4:
        raise ValueError(f"quantize={knobs.get('quantize')!r}, embedding_bits={knobs.get('embedding_bits', 4)!r}: "
                         "this size model covers int4 g64 blocks + an int4 g64 embedding; choose an int4 quantize "
                         "choice ('int4', 'int4 + AWQ', 'int4 + AWQ + GPTQ', 'int4 QAT from AWQ + GPTQ') with "
                         "embedding_bits=4")
    cfg = pruned_config(config, knobs.get("heads_keep", 1.0), knobs.get("channels_keep", 1.0),
                        knobs.get("layers_keep", 1.0))
    return predicted_parts(size_model, cfg, group_size)


def reduction_by_parts(overall_reduction, teacher_bytes: int, embedding_fp32_bytes: int, measured: dict) -> dict:
    """Amdahl's law for bytes on a saved model: the learner's ``overall_reduction`` from each part's own factor.

    The embedding's share of the fp32 file and its factor, the rest's factor (blocks, norms, header),
    both from :func:`measured_parts`; the whole file's reduction follows. Returns those and ``by``.
    """
    fn = yours_or_reference(overall_reduction, overall_reduction_reference, "my_overall_reduction")
    share = embedding_fp32_bytes / teacher_bytes
    emb_factor = embedding_fp32_bytes / measured["embedding"]
    rest_factor = (teacher_bytes - embedding_fp32_bytes) / (measured["file"] - measured["embedding"])
    return {"share": share, "embedding_factor": emb_factor, "rest_factor": rest_factor,
            "reduction": float(fn(share, emb_factor, rest_factor)), "by": fn.label}


def pareto_names(pareto, points: list[dict]) -> tuple[list[str], str]:
    """Names of the points (``size_mib``, ``ppl_ratio``) on the learner's Pareto front, and who computed it."""
    fn = yours_or_reference(pareto, pareto_reference, "my_pareto_front")
    sizes = torch.tensor([p["size_mib"] for p in points], dtype=torch.float64)
    ppls = torch.tensor([p["ppl_ratio"] for p in points], dtype=torch.float64)
    front = torch.as_tensor(fn(sizes, ppls)).bool().tolist()
    return [p["name"] for p, on in zip(points, front) if on], fn.label
