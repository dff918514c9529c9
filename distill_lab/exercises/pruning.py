"""Lab of notebook 03 (pruning): a per-row magnitude mask, Wanda scores, a 2:4 mask, which MLP channels to keep.

The learner writes the scores and masks; :func:`pruned_perplexities` prunes every Linear of the real
teacher with them (zeros written in place, the weights restored afterwards) and measures the
perplexity, for the learner's functions and for the package's on the same windows.
:func:`shrink_mlp` rebuilds the teacher with smaller MLPs from the channels the learner keeps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._check import allclose, check, label_of, yours_or_reference
from ._lab import weights_replaced
from ._package import nm_mask, unstructured_mask

__all__ = ["channels_reference", "check_channels_to_keep", "check_magnitude_mask", "check_nm_mask",
           "check_wanda_scores", "magnitude_mask_reference", "nm_reference", "pruned_perplexities", "shrink_mlp",
           "wanda_reference"]


def magnitude_mask_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    return unstructured_mask(weight.abs(), sparsity, "row")


def wanda_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.abs() * x.pow(2).sum(0).sqrt()[None, :]  # (out, in) * ||X_j||_2


def nm_reference(scores: torch.Tensor) -> torch.Tensor:
    return nm_mask(scores, 2, 4)


def channels_reference(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` highest-scoring channels, in increasing index order (what structured pruning keeps)."""
    return torch.sort(torch.topk(scores, n_keep).indices).values


def _cases_weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g), torch.randn(16, 32, generator=g), torch.randn(3, 12, generator=g)]


def _real(layer):
    w = layer.weight if hasattr(layer, "weight") else layer
    return w.detach().float().cpu(), f"the teacher's layer {tuple(w.shape)}"


def _mask_within(groups_of):
    """Correctness of a keep-mask when scores may tie: per group the right count, no dropped score above a kept one.

    ``groups_of(scores, case) -> (scores (G, n), n_drop)`` splits the case's scores into the groups a
    mask is chosen in (rows, or groups of 4 inputs).
    """
    def compare(got, want, case):
        got, want = torch.as_tensor(got), torch.as_tensor(want)
        if got.shape != want.shape:
            return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != torch.bool:
            return f"dtype {got.dtype}: return a bool mask (True = keep)"
        scores, n_drop = groups_of(case)
        keep = got.reshape(scores.shape)
        dropped = (~keep).sum(-1)
        if bool((dropped != n_drop).any()):
            i = int((dropped != n_drop).nonzero()[0, 0])
            return f"group {i} drops {int(dropped[i])} weights, expected {n_drop}"
        inf = torch.tensor(float("inf"), dtype=scores.dtype)
        low_kept = torch.where(keep, scores, inf).amin(-1)
        high_dropped = torch.where(keep, -inf, scores).amax(-1)
        bad = high_dropped > low_kept
        if bool(bad.any()):
            return f"{int(bad.sum())} groups drop a weight that scores higher than one they keep"
        return None
    return compare


def _equal(got, want, case):
    return allclose(torch.as_tensor(got).double(), torch.as_tensor(want).double(), 0, 0)


def _row_groups(case):
    weight, sparsity = case
    return weight.abs().double(), int(weight.shape[1] * sparsity)


def _nm_groups(case):
    (scores,) = case
    return scores.double().reshape(-1, 4), 2


def _row_mask(scores, sparsity, largest=False):
    k = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=largest).indices, False)
    return mask


def _global_mask(scores, sparsity):
    k = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return mask.reshape(scores.shape)


def check_magnitude_mask(fn, layer=None) -> bool:
    """Check ``fn(weight, sparsity)``: a bool keep-mask that zeros the smallest |w| in each output row.

    ``layer``: a Linear of the teacher (or its weight), masked at 50 % as one more case. Its weights
    tie often (it was stored on a 4-bit grid), so any choice among tied weights is accepted.
    """
    weights = _cases_weights(0)
    cases = [(weights[0], 0.5), (weights[1], 0.25), (weights[2], 0.5), (weights[1], 0.0)]
    labels = [None] * 4
    if layer is not None:
        w, label = _real(layer)
        cases.append((w, 0.5))
        labels.append(f"{label} at 50 %")
    mistakes = [("sorted the whole matrix instead of each row: every output row loses exactly "
                 "int(sparsity · in_features) weights (topk or sort along dim=1)",
                 lambda w, s: _global_mask(w.abs(), s)),
                ("dropped the largest |w|: drop the int(sparsity · in) smallest of each row "
                 "(topk(..., largest=False))",
                 lambda w, s: _row_mask(w.abs(), s, largest=True)),
                ("forgot abs(): a large negative weight matters as much as a large positive one",
                 lambda w, s: _row_mask(w, s)),
                ("pruned each column (dim=0) instead of each output row (dim=1)",
                 lambda w, s: _row_mask(w.abs().T, s).T),
                ("the mask is inverted: True = keep, so the pruned weights are the False ones",
                 lambda w, s: ~_row_mask(w.abs(), s))]
    return check("magnitude mask (per row)", lambda w, s: torch.as_tensor(fn(w, s)).bool(),
                 magnitude_mask_reference, cases, labels=labels, mistakes=mistakes,
                 compare=_mask_within(_row_groups), match=_equal, match_real=False)


def check_wanda_scores(fn, layer=None, x: torch.Tensor | None = None) -> bool:
    """Check ``fn(weight, x)``: Wanda scores |W_ij| * ||X_j||_2 for weight (out, in) and inputs x (tokens, in).

    ``layer`` and ``x``: a Linear of the teacher and its real calibration inputs, as one more case.
    """
    g = torch.Generator().manual_seed(1)
    weights = _cases_weights(1)
    cases = [(w, torch.randn(10, w.shape[1], generator=g) * torch.rand(w.shape[1], generator=g) * 5)
             for w in weights]
    labels = [None] * len(cases)
    if layer is not None and x is not None:
        w, label = _real(layer)
        cases.append((w, x.detach().float().cpu()))
        labels.append(f"{label} and {x.shape[0]} of its real input rows")
    mistakes = [("the mean instead of the L2 norm: ||X_j||_2 = sqrt(Σ_t x_tj²), a sum over tokens, not a mean",
                 lambda w, x: w.abs() * x.pow(2).mean(0).sqrt()[None]),
                ("missing square root: ||X_j||_2 = sqrt(Σ_t x_tj²)", lambda w, x: w.abs() * x.pow(2).sum(0)[None]),
                ("mean |x| (AWQ's statistic), not the L2 norm sqrt(Σ_t x_tj²)",
                 lambda w, x: w.abs() * x.abs().mean(0)[None]),
                ("forgot abs(W): the score is |W_ij| · ||X_j||_2, never negative",
                 lambda w, x: w * x.pow(2).sum(0).sqrt()[None])]
    return check("Wanda scores", fn, wanda_reference, cases, labels=labels, mistakes=mistakes)


def check_nm_mask(fn, layer=None) -> bool:
    """Check ``fn(scores)``: a bool keep-mask keeping the 2 best of every 4 consecutive inputs of each row.

    ``layer``: a Linear of the teacher (or its weight); its |W| make one more case (ties accepted).
    """
    cases = [(w.abs(),) for w in _cases_weights(2)]
    labels = [None] * len(cases)
    if layer is not None:
        w, label = _real(layer)
        cases.append((w.abs(),))
        labels.append(f"|W| of {label}")

    def groups_of_4(scores, largest=True, transpose=False):
        s = scores.T if transpose else scores
        g = s.reshape(s.shape[0], -1, 4)
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, torch.topk(g, 2, -1, largest=largest).indices, True)
        mask = mask.reshape(s.shape)
        return mask.T if transpose else mask

    mistakes = [("kept the 2 lowest of each group: keep the 2 highest scores (topk(..., 2, dim=-1))",
                 lambda s: groups_of_4(s, largest=False)),
                ("groups run down the columns: a group is 4 consecutive inputs of one output row "
                 "(reshape to (out, in // 4, 4))", lambda s: groups_of_4(s, transpose=True)),
                ("kept the best half of each row: 2:4 chooses within every group of 4 inputs",
                 lambda s: _row_mask(s, 0.5))]
    return check("2:4 mask", lambda s: torch.as_tensor(fn(s)).bool(), nm_reference, cases, labels=labels,
                 mistakes=mistakes, compare=_mask_within(_nm_groups), match=_equal, match_real=False)


def check_channels_to_keep(fn, scores: torch.Tensor | None = None, n_keep: int | None = None) -> bool:
    """Check ``fn(scores (I,), n_keep) -> indices``: the ``n_keep`` highest-scoring channels (any order).

    ``scores`` and ``n_keep``: a real importance vector of the teacher (one block's MLP channels).
    """
    g = torch.Generator().manual_seed(6)
    cases = [(torch.rand(8, generator=g), 3), (torch.rand(64, generator=g) * 10, 48), (torch.randn(20, generator=g), 1)]
    labels = [None] * len(cases)
    if scores is not None:
        cases.append((scores.detach().float().cpu(), n_keep))
        labels.append(f"the teacher's importance of {scores.numel()} MLP channels")

    def as_sorted(got):  # any order of the same indices is right
        return torch.sort(torch.as_tensor(got).reshape(-1).double()).values

    mistakes = [("kept the least important channels: keep the n_keep highest scores", lambda s, n: torch.topk(
                    s, n, largest=False).indices),
                ("returned the scores, not the channel indices: use topk(...).indices",
                 lambda s, n: torch.topk(s, n).values),
                ("returned a mask: return the indices of the kept channels (e.g. torch.topk(scores, n_keep).indices)",
                 lambda s, n: torch.zeros(len(s), dtype=torch.bool).scatter_(0, torch.topk(s, n).indices, True))]
    return check("channels to keep", lambda s, n: as_sorted(fn(s, n)), channels_reference, cases, atol=0, rtol=0,
                 labels=labels, mistakes=[(h, (lambda v: lambda s, n: as_sorted(v(s, n)))(v)) for h, v in mistakes])


# ---------------------------------------------------------------------------------------- the lab


def _norm_rows(x_norm: torch.Tensor) -> torch.Tensor:
    """One input row whose column norms are ``x_norm``: a stand-in for a layer's calibration inputs.

    ``||X_j||_2`` of a single row ``x_norm`` is ``|x_norm_j|`` = ``x_norm_j``, so a Wanda score computed
    from it equals the one computed from the thousands of real input rows, without storing them.
    """
    return x_norm.detach().float().cpu()[None, :]


def pruned_perplexities(model, norms: dict, perplexity, magnitude_mask, wanda_scores, nm_mask_fn,
                        sparsity: float = 0.5) -> dict:
    """Perplexity of ``model`` pruned by magnitude (per row), by Wanda (per row) and by Wanda 2:4.

    The masks come from the learner's functions (or the references, when not attempted): magnitude
    is ``magnitude_mask(W, s)``; Wanda applies the same per-row mask function to the scores
    ``wanda_scores(W, X)``; 2:4 applies ``nm_mask_fn`` to them. ``norms``: ``{linear name: ||X_j||_2}``
    (``input_norms`` of the dense model). Returns ``{"ppl": {method: ppl}, "by": ...}``.
    """
    mask = yours_or_reference(magnitude_mask, magnitude_mask_reference, "my_magnitude_mask")
    scores = yours_or_reference(wanda_scores, wanda_reference, "my_wanda_scores")
    nm = yours_or_reference(nm_mask_fn, nm_reference, "my_nm_mask")
    methods = {
        f"magnitude {sparsity:.0%}": lambda name, w: mask(w, sparsity),
        f"Wanda {sparsity:.0%}": lambda name, w: mask(scores(w, _norm_rows(norms[name])), sparsity),
        "Wanda 2:4": lambda name, w: nm(scores(w, _norm_rows(norms[name]))),
    }
    out = {}
    for method, keep in methods.items():
        with weights_replaced(model, lambda name, w: w * torch.as_tensor(keep(name, w)).to(w.dtype)):
            out[method] = perplexity(model)
    return {"ppl": out, "by": label_of(mask, scores, nm)}


def shrink_mlp(model: nn.Module, channels_to_keep, channel_scores: torch.Tensor, n_keep: int) -> tuple[nn.Module, str]:
    """A copy of ``model`` whose every MLP keeps only ``channels_to_keep(scores[layer], n_keep)``, and who chose them.

    gate_proj and up_proj lose the dropped output rows, down_proj the same input columns, so the
    block computes exactly what the teacher computed on the kept channels. ``channel_scores``:
    ``(layers, intermediate_size)`` importance (e.g. ``importance(teacher, "activation")["channels"]``).
    Returns ``(smaller model, "yours" | "reference")``.
    """
    keep_fn = yours_or_reference(channels_to_keep, channels_reference, "my_channels_to_keep")
    mlps = [block.mlp for block in model.model.layers]
    # the copy skips the MLP weights (replaced below): placeholders in deepcopy's memo stand in for them
    memo = {id(p): nn.Parameter(torch.empty(0)) for mlp in mlps for p in mlp.parameters()}
    small = copy.deepcopy(model, memo)
    for layer, (mlp, big) in enumerate(zip((b.mlp for b in small.model.layers), mlps)):
        keep = torch.as_tensor(keep_fn(channel_scores[layer], n_keep)).long().reshape(-1)
        for name in ("gate_proj", "up_proj"):  # (intermediate, hidden): keep rows
            setattr(mlp, name, _linear_from(getattr(big, name).weight[keep]))
        mlp.down_proj = _linear_from(big.down_proj.weight[:, keep])  # (hidden, intermediate): keep columns
    small.config.intermediate_size = n_keep
    return small, keep_fn.label


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear
