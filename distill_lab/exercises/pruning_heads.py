"""Algorithm lab of notebook 03: prune query heads under grouped-query attention, and really shrink the model.

In grouped-query attention (GQA; Ainslie et al., 2023, arXiv:2305.13245) ``H`` query heads share
``G`` key/value heads: query head ``h`` reads KV head ``h // (H / G)``. Pruning query heads must keep
that structure: every KV group keeps the same number of query heads, listed group-major, so that the
smaller model's ``H' / G`` still maps each kept query head to its own KV head. ``q_proj`` loses the
dropped heads' output rows (``head_dim`` rows each) and ``o_proj`` the same input columns; ``k_proj``
and ``v_proj`` stay. (Minitron, Muralidharan et al., 2024, arXiv:2407.14679, prunes heads this way.)

:func:`check_prune_query_heads` checks the learner's function on random weights and on a teacher block;
:func:`shrink_heads` rebuilds the whole teacher with it, so the next cell can compare the learner's
smaller model with ``pruning.prune_structured`` on the same scores.
"""

from __future__ import annotations

import torch
from torch import nn

from ._check import check, yours_or_reference
from ._package import adapter

__all__ = ["check_prune_query_heads", "prune_query_heads_reference", "shrink_heads"]


def prune_query_heads_reference(q_weight: torch.Tensor, o_weight: torch.Tensor, head_scores: torch.Tensor,
                                kv_heads: int, keep_per_group: int):
    """``(q_weight', o_weight', kept)``: the ``keep_per_group`` best query heads of every KV group, group-major."""
    heads = head_scores.numel()
    n_rep, d = heads // kv_heads, q_weight.shape[0] // heads
    per_group = head_scores.reshape(kv_heads, n_rep)  # (G, H/G)
    best = torch.sort(torch.topk(per_group, keep_per_group, dim=1).indices, dim=1).values  # (G, k)
    kept = (best + torch.arange(kv_heads)[:, None] * n_rep).reshape(-1)  # (G·k,) group-major
    q = q_weight.reshape(heads, d, -1)[kept].reshape(-1, q_weight.shape[1])  # (G·k·d, hidden)
    o = o_weight.reshape(o_weight.shape[0], heads, d)[:, kept].reshape(o_weight.shape[0], -1)  # (hidden, G·k·d)
    return q, o, kept


def _flat(result) -> torch.Tensor:
    q, o, kept = result
    return torch.cat([torch.as_tensor(q).double().flatten(), torch.as_tensor(o).double().flatten(),
                      torch.as_tensor(kept).double().flatten()])


def _variant(across_groups=False, unsorted=False, o_rows=False):
    """A wrong head pruning (top heads over all groups, kept order, o_proj sliced by rows)."""
    def wrong(q_weight, o_weight, head_scores, kv_heads, keep_per_group):
        heads = head_scores.numel()
        n_rep, d = heads // kv_heads, q_weight.shape[0] // heads
        if across_groups:
            kept = torch.sort(torch.topk(head_scores, kv_heads * keep_per_group).indices).values
        else:
            best = torch.topk(head_scores.reshape(kv_heads, n_rep), keep_per_group, dim=1).indices
            if not unsorted:
                best = torch.sort(best, dim=1).values
            kept = (best + torch.arange(kv_heads)[:, None] * n_rep).reshape(-1)
        q = q_weight.reshape(heads, d, -1)[kept].reshape(-1, q_weight.shape[1])
        if o_rows:  # the same rows as q_proj: a (kept·d, H·d) matrix where (hidden, kept·d) is needed
            o = o_weight[(kept[:, None] * d + torch.arange(d)[None, :]).reshape(-1)]
        else:
            o = o_weight.reshape(o_weight.shape[0], heads, d)[:, kept].reshape(o_weight.shape[0], -1)
        return q, o, kept
    return wrong


_MISTAKES = [
    ("the GQA groups no longer match: keep the best keep_per_group heads *within each* KV group "
     "(scores.reshape(kv_heads, -1)), not the best heads over all of them", _variant(across_groups=True)),
    ("the kept heads are in score order: list them group-major in increasing index (sort within each group), "
     "so kept head j belongs to KV head j // keep_per_group", _variant(unsorted=True)),
    ("o_proj sliced by rows: its *input* columns (dim 1) are the heads' outputs, head_dim columns per head",
     _variant(o_rows=True)),
]


def check_prune_query_heads(fn, block=None) -> bool:
    """Check ``fn(q_weight, o_weight, head_scores, kv_heads, keep_per_group) -> (q', o', kept)``.

    ``block``: ``(q_weight, o_weight, head_scores, kv_heads)`` of a teacher block, kept at 2 of 3 heads per group.
    """
    g = torch.Generator().manual_seed(11)

    def case(heads, kv, d, keep):  # hidden = heads · head_dim, as in the teacher (9 · 64 = 576)
        hidden = heads * d
        return (torch.randn(heads * d, hidden, generator=g), torch.randn(hidden, heads * d, generator=g),
                torch.rand(heads, generator=g), kv, keep)

    cases = [case(6, 2, 4, 2), case(8, 2, 2, 1), case(9, 3, 3, 2), case(4, 4, 2, 1)]  # the last: one head per group
    labels = [None] * len(cases)
    if block is not None:
        q_weight, o_weight, scores, kv = block
        cases.append((q_weight.detach().float().cpu(), o_weight.detach().float().cpu(), scores.float().cpu(), kv,
                      2 * scores.numel() // (3 * kv)))
        labels.append(f"the teacher's q_proj {tuple(q_weight.shape)} and o_proj {tuple(o_weight.shape)}")
    return check("query-head pruning under GQA", lambda *c: _flat(fn(*c)),
                 lambda *c: _flat(prune_query_heads_reference(*c)), cases, atol=0, rtol=0, labels=labels,
                 mistakes=[(h, (lambda v: lambda *c: _flat(v(*c)))(v)) for h, v in _MISTAKES], match_real=False)


@torch.no_grad()
def shrink_heads(model: nn.Module, prune_query_heads, head_scores: torch.Tensor, keep_per_group: int):
    """A smaller copy of ``model`` whose every block keeps the query heads ``prune_query_heads`` keeps, and who chose.

    ``head_scores``: (layers, heads) importance (e.g. ``pruning.importance(teacher, "l2_norm")["heads"]``).
    The model is rebuilt from a smaller config (``num_attention_heads = kv_heads · keep_per_group``); its
    q_proj and o_proj hold the learner's slices. Returns ``(smaller model, "yours" | "reference")``.
    """
    fn = yours_or_reference(prune_query_heads, prune_query_heads_reference, "my_prune_query_heads")
    ad = adapter(model, "query-head pruning")
    kv = ad.kv_heads
    sliced = []
    for i, block in enumerate(ad.blocks):
        attn = block.self_attn
        q, o, kept = fn(attn.q_proj.weight.float().cpu(), attn.o_proj.weight.float().cpu(), head_scores[i],
                        kv, keep_per_group)
        sliced.append((torch.as_tensor(q), torch.as_tensor(o), torch.as_tensor(kept).long()))
    small = ad.shrink(list(range(len(ad.blocks))), heads=[k for _, _, k in sliced], kv=None)
    for block, (q, o, _) in zip(adapter(small).blocks, sliced):  # the learner's slices, not the package's
        for linear, weight in ((block.self_attn.q_proj, q), (block.self_attn.o_proj, o)):
            if tuple(weight.shape) != tuple(linear.weight.shape):
                raise ValueError(f"a slice of shape {tuple(weight.shape)} where the smaller model needs "
                                 f"{tuple(linear.weight.shape)}")
            linear.weight.copy_(weight.to(linear.weight))
    return small, fn.label
