"""Algorithm lab of notebook 02: AWQ's search for the activation-aware scale exponent, written by the learner.

AWQ (Lin et al., 2024, arXiv:2306.00978) protects the weight columns that meet large activations: for
Linears that read one input ``x`` (S, K), it multiplies column ``j`` of every weight by
``s_j = mean|x_j|^a`` before rounding to int4 and divides the input by ``s_j`` (folded into the previous
op), so the float product is unchanged and only the rounding error moves. The exponent ``a`` is searched
on a grid in [0, 1] by the output error of the quantized Linears,

    err(a) = Σ_W ‖x Wᵀ − (x / s) Q(W · s)ᵀ‖²,

with ``a = 0`` (plain round-to-nearest) in the grid, so the search never does worse on its calibration
rows. The learner writes ``awq_search(x, weights, act_mean, grid, bits, group_size) -> (a, s, errors)``;
:func:`awq_block_lab` runs it on a teacher block beside ``quantization.awq_``'s choice.
"""

from __future__ import annotations

import torch

from ._check import allclose, check, label_of, yours_or_reference
from ._package import fake_quantize

__all__ = ["awq_block_lab", "awq_search_reference", "check_awq_search"]


def _error(x, weights, s, bits, group_size) -> float:
    xs = x / s  # (S, K)
    return sum(float((xs @ fake_quantize(w * s, bits, group_size, symmetric=False).t() - x @ w.t()).pow(2).sum())
               for w in weights)


def awq_search_reference(x: torch.Tensor, weights: list, act_mean: torch.Tensor, grid: int, bits: int = 4,
                         group_size: int = 64):
    """``(best a, its (K,) scale, [err(a) for a in linspace(0, 1, grid)])``, scales centred by ``sqrt(max·min)``."""
    mean = act_mean.float().clamp_min(1e-6)
    errors, best = [], (float("inf"), 0.0, None)
    for a in torch.linspace(0, 1, grid).tolist():
        s = mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = _error(x.float(), [w.float() for w in weights], s, bits, group_size)
        errors.append(err)
        if err < best[0]:
            best = (err, a, s)
    return best[1], best[2], errors


def _variant(no_input_scale=False, divide_weights=False, no_zero=False):
    """A wrong search (input left unscaled, weights divided, a grid without a = 0)."""
    def wrong(x, weights, act_mean, grid, bits=4, group_size=64):
        mean = act_mean.float().clamp_min(1e-6)
        grid_a = torch.linspace(0, 1, grid + 1)[1:] if no_zero else torch.linspace(0, 1, grid)
        errors, best = [], (float("inf"), 0.0, None)
        for a in grid_a.tolist():
            s = mean.pow(a)
            s = s / (s.max() * s.min()).sqrt()
            xs = x if no_input_scale else x / s
            err = sum(float((xs @ fake_quantize(w / s if divide_weights else w * s, bits, group_size,
                                                symmetric=False).t() - x @ w.t()).pow(2).sum()) for w in weights)
            errors.append(err)
            if err < best[0]:
                best = (err, a, s)
        return best[1], best[2], errors
    return wrong


_MISTAKES = [
    ("the input is not divided by s: the weights' columns grow by s, so the input must shrink by s, or the "
     "product changes", _variant(no_input_scale=True)),
    ("the weights are divided by s: multiply the columns that meet large activations (W · s) so they round "
     "more finely, and divide the input", _variant(divide_weights=True)),
    ("a = 0 is missing from the grid: include plain round-to-nearest (torch.linspace(0, 1, grid)) so the "
     "search can never do worse than no scaling", _variant(no_zero=True)),
]


def _flat(result) -> torch.Tensor:
    a, s, errors = result
    return torch.cat([torch.tensor([float(a)], dtype=torch.float64), torch.as_tensor(s).double().flatten(),
                      torch.as_tensor(errors, dtype=torch.float64).flatten()])


def check_awq_search(fn, group=None) -> bool:
    """Check ``fn(x, weights, act_mean, grid, bits, group_size) -> (a, s, errors)``.

    ``group``: ``(x, [weights], act_mean)`` of a teacher block's Linears that share one input, as one more case.
    """
    g = torch.Generator().manual_seed(17)

    def case(s, k, outs, grid, group_size):
        x = torch.randn(s, k, generator=g) * torch.linspace(0.2, 4.0, k)
        x[:, 1] *= 30  # one outlier channel, as on the teacher
        return (x, [torch.randn(n, k, generator=g) * 0.05 for n in outs], x.abs().mean(0), grid, 4, group_size)

    cases = [case(32, 16, [8], 5, 8), case(64, 32, [16, 16], 7, 16), case(16, 64, [4], 3, 32)]
    labels = [None] * 3
    if group is not None:
        x, weights, act_mean = group
        cases.append((x.float().cpu(), [w.detach().float().cpu() for w in weights], act_mean.float().cpu(), 5, 4, 64))
        labels.append(f"the teacher's {len(weights)} Linears sharing one input, {x.shape[0]} calibration rows")

    def compare(got, want, case):  # the errors within 1e-4 relative; a and s must then be the same choice
        return allclose(got, want, 1e-6, 1e-4)

    return check("AWQ scale search", lambda *c: _flat(fn(*c)), lambda *c: _flat(awq_search_reference(*c)), cases,
                 labels=labels, compare=compare, mistakes=[(h, (lambda v: lambda *c: _flat(v(*c)))(v))
                                                           for h, v in _MISTAKES])


def awq_block_lab(x: torch.Tensor, weights: list, act_mean: torch.Tensor, awq_search, package_a: float,
                  grid: int = 11, bits: int = 4, group_size: int = 64) -> dict:
    """The learner's search on one teacher group beside ``awq_``'s chosen exponent ``package_a`` for it.

    Returns ``{"a", "errors", "grid", "rtn_error", "best_error", "package_a", "by"}``.
    """
    fn = yours_or_reference(awq_search, awq_search_reference, "my_awq_search")
    a, _, errors = fn(x.float(), [w.float() for w in weights], act_mean.float(), grid, bits, group_size)
    errors = [float(e) for e in errors]
    return {"a": float(a), "errors": errors, "grid": torch.linspace(0, 1, grid).tolist(), "rtn_error": errors[0],
            "best_error": min(errors), "package_a": float(package_a), "by": label_of(fn)}
