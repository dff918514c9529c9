"""Algorithm lab of notebook 01: score every block by Block Influence, drop the weakest, rebuild a working student.

Block Influence (ShortGPT, Men et al., 2024, arXiv:2403.03853) of block ``i`` is
``BI_i = 1 - E_t[cos(x_in_t, x_out_t)]``: a block whose output points where its input did changes
little, and removing it costs little. The learner writes

* ``block_influence(pairs) -> (L,)``, from each block's input and output hidden states;
* ``drop_blocks(model, keep) -> model``: a copy keeping the blocks ``keep``, renumbered so that the KV
  cache (indexed by each attention's ``layer_idx``) and the config (``num_hidden_layers``,
  ``layer_types``) agree with the new depth.

:func:`block_io` records the pairs on the real teacher with forward hooks, :func:`check_block_influence`
and :func:`check_drop_blocks` check the learner's functions, and :func:`student_from_influence` builds
the student both ways (the learner's, the package's ``pruning.block_influence`` + ``prune_structured``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import device_of
from ._check import allclose, check, label_of, not_attempted, yours_or_reference
from ._package import adapter

__all__ = ["block_influence_reference", "block_io", "check_block_influence", "check_drop_blocks",
           "drop_blocks_reference", "student_from_influence"]


def block_influence_reference(pairs) -> torch.Tensor:
    """``1 - mean cos(x_in, x_out)`` per block over every token; ``pairs``: [(x_in, x_out)], each (B, T, H)."""
    return torch.stack([1 - F.cosine_similarity(x_in.double(), x_out.double(), dim=-1).mean()
                        for x_in, x_out in pairs]).float()


def _bi_variant(similarity=False, token_axis=False, distance=False):
    def wrong(pairs):
        out = []
        for x_in, x_out in pairs:
            a, b = x_in.double(), x_out.double()
            if distance:
                out.append((a - b).norm(dim=-1).mean())
                continue
            cos = F.cosine_similarity(a, b, dim=1 if token_axis else -1).mean()
            out.append(cos if similarity else 1 - cos)
        return torch.stack(out).float()
    return wrong


_BI_MISTAKES = [
    ("cosine similarity instead of influence: BI = 1 - cos, so a block that changes little scores low",
     _bi_variant(similarity=True)),
    ("cosine over the wrong axis: compare each token's hidden vector (dim=-1), then average over tokens",
     _bi_variant(token_axis=True)),
    ("a distance instead of an angle: ShortGPT uses 1 - cos, which ignores how much the norm grows",
     _bi_variant(distance=True)),
]


def check_block_influence(fn, pairs=None) -> bool:
    """Check ``fn(pairs) -> (L,)`` Block Influence; ``pairs``: the teacher's recorded (x_in, x_out), as one more case."""
    g = torch.Generator().manual_seed(12)

    def case(blocks, b, t, h):
        out = []
        for _ in range(blocks):
            x = torch.randn(b, t, h, generator=g)
            out.append((x, x + torch.rand(1, generator=g) * torch.randn(b, t, h, generator=g)))
        return (out,)

    cases = [case(3, 2, 5, 8), case(4, 1, 7, 16), case(2, 3, 4, 6)]
    labels = [None] * 3
    if pairs is not None:
        cases.append(([(a.detach().float().cpu(), b.detach().float().cpu()) for a, b in pairs],))
        labels.append(f"the teacher's {len(pairs)} blocks on a calibration batch")
    return check("Block Influence", fn, block_influence_reference, cases, atol=1e-5, rtol=1e-4, labels=labels,
                 mistakes=_BI_MISTAKES)


@torch.no_grad()
def block_io(model: nn.Module, input_ids: torch.Tensor) -> list:
    """``[(x_in, x_out)]`` of every decoder block of ``model`` on ``input_ids`` (B, T), recorded by forward hooks."""
    blocks = adapter(model, "Block Influence").blocks
    pairs, handles = [None] * len(blocks), []

    def hook(i):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            x_out = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            pairs[i] = (x_in.detach().float().cpu(), x_out.detach().float().cpu())
        return fn

    try:
        handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        model(input_ids.to(device_of(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return pairs


@torch.no_grad()
def drop_blocks_reference(model: nn.Module, keep) -> nn.Module:
    """A copy of ``model`` with only the blocks ``keep`` (sorted), built by the package's adapter."""
    return adapter(model, "layer dropping").shrink(sorted(int(i) for i in keep))


def _greedy(model: nn.Module, ids: torch.Tensor, steps: int, use_cache: bool) -> torch.Tensor:
    """Greedy continuation of ``ids`` (1, T): with the KV cache, or recomputing the whole sequence each step."""
    out, cache = ids, None
    with torch.no_grad():
        for _ in range(steps):
            if use_cache:
                res = model(out[:, -1:] if cache is not None else out, cache=cache, use_cache=True)
                cache = res.cache
            else:
                res = model(out, use_cache=False)
            out = torch.cat([out, res.logits[:, -1:].argmax(-1)], dim=1)
    return out


def check_drop_blocks(fn, model: nn.Module, keep=(0, 2)) -> bool:
    """Check ``fn(model, keep) -> smaller model`` on ``model`` (a tiny Llama in the tests, the teacher in 01).

    The smaller model must compute what the package's rebuild computes, with and without the KV cache,
    and leave ``model`` untouched.
    """
    keep = list(keep)
    ids = torch.arange(1, 9)[None, :] % model.config.vocab_size  # (1, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        small = fn(model, keep)
    except NotImplementedError:
        return not_attempted("dropping blocks")
    now = model.state_dict()
    if set(now) != set(before) or any(not torch.equal(v, now[k]) for k, v in before.items()):
        raise AssertionError("dropping blocks: the original model changed; work on a copy (copy.deepcopy(model))")
    want = drop_blocks_reference(model, keep)
    problems = []
    if small.config.num_hidden_layers != len(keep):
        problems.append(f"config.num_hidden_layers is {small.config.num_hidden_layers}, expected {len(keep)}")
    with torch.no_grad():
        diff = allclose(small(ids, use_cache=False).logits, want(ids, use_cache=False).logits, 1e-5, 1e-4)
    if diff:
        problems.append(f"its logits differ from the package's rebuild: {diff}")
    try:
        cached_ok = torch.equal(_greedy(small, ids, 4, True), _greedy(small, ids, 4, False))
    except Exception as err:  # noqa: BLE001 - a stale layer_idx may index past the cache
        cached_ok, problems = False, problems + [f"decoding with the KV cache raised {type(err).__name__}: {err}"]
    if not cached_ok:
        problems.append("greedy decoding with the KV cache differs from decoding without it\n  likely mistake: "
                        "the kept blocks still carry their old layer_idx: the KV cache stores block i's keys "
                        "and values at index layer_idx, so renumber self_attn.layer_idx = 0, 1, 2, ...")
    attn_types = getattr(small.config, "layer_types", None)
    if attn_types is not None and len(attn_types) != len(keep):
        problems.append(f"config.layer_types has {len(attn_types)} entries for {len(keep)} blocks: keep the "
                        "kept blocks' entries")
    if problems:
        raise AssertionError("dropping blocks: " + "; ".join(problems))
    print(f"dropping blocks: correct: {len(keep)} of {len(adapter(model).blocks)} blocks, the same logits as the "
          "package's rebuild, and the KV cache decodes what a full recompute does.")
    return True


def student_from_influence(teacher: nn.Module, pairs, block_influence, drop_blocks, n_keep: int) -> dict:
    """The student of the learner's functions beside the package's: kept blocks, and both models.

    Keeps the ``n_keep`` blocks with the highest influence (the learner's scores, or the reference's
    when not attempted). Returns ``{"keep", "bi", "model", "package_bi", "package_model", "by"}``.
    """
    bi_fn = yours_or_reference(block_influence, block_influence_reference, "my_block_influence")
    drop = yours_or_reference(drop_blocks, drop_blocks_reference, "my_drop_blocks")
    bi = torch.as_tensor(bi_fn(pairs)).float()
    keep = sorted(torch.topk(bi, n_keep).indices.tolist())
    ref_bi = block_influence_reference(pairs)
    ref_keep = sorted(torch.topk(ref_bi, n_keep).indices.tolist())
    return {"keep": keep, "bi": bi, "model": drop(teacher, keep), "package_bi": ref_bi, "package_keep": ref_keep,
            "package_model": drop_blocks_reference(teacher, ref_keep), "by": label_of(bi_fn, drop)}
