"""Lab of notebook 02 (quantization): absmax codes, group-wise round-to-nearest, SQNR.

The learner writes the quantizers; :func:`fake_quant_perplexities` applies one to every Linear of the
real teacher (quantize, then dequantize in place: "fake quantization") and measures the perplexity,
for the learner's function and for the package's ``fake_quantize`` on the same windows.
"""

from __future__ import annotations

import math

import torch

from ._check import allclose, check, label_of, yours_or_reference
from ._lab import weights_replaced
from ._package import fake_quantize, quantize_tensor, sqnr_db

__all__ = ["absmax_fake_quant", "absmax_reference", "check_absmax_quantize", "check_group_rtn",
           "check_minmax_group_fake_quant", "check_sqnr", "fake_quant_perplexities", "group_rtn_reference",
           "layer_sqnr", "package_absmax"]


def _codes_and_scales(result) -> torch.Tensor:
    codes, scales = result
    return torch.cat([torch.as_tensor(codes).double().flatten(), torch.as_tensor(scales).double().flatten()])


def absmax_reference(w: torch.Tensor, bits: int):
    """Per-row symmetric codes (int8 tensor) and scales (one per row), as ``quantize_tensor`` makes them."""
    q = quantize_tensor(w, bits, None, True, -1)
    return q.codes, q.scales.reshape(-1)


def group_rtn_reference(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest per group of ``group_size`` inputs, dequantized (``fake_quantize``)."""
    return fake_quantize(w, bits, group_size, symmetric=False)


def _real_layer(layer):
    """The float32 CPU weight of a Linear (or a weight tensor), and a label for it."""
    w = layer.weight if hasattr(layer, "weight") else layer
    return w.detach().float().cpu(), f"the teacher's layer {tuple(w.shape)}"


def _absmax_variant(qmax_of=lambda b: 2 ** (b - 1) - 1, per_row=True, rounding=torch.round, clamp=True):
    """A wrong absmax quantizer (largest code, scale granularity, rounding)."""
    def wrong(w, bits):
        qmax = qmax_of(bits)
        amax = w.abs().amax(1, keepdim=True) if per_row else w.abs().amax().expand(w.shape[0], 1)
        scale = (amax / qmax).clamp_min(1e-12)  # (rows, 1)
        codes = rounding(w / scale)
        return (codes.clamp(-qmax, qmax) if clamp else codes), scale.reshape(-1)
    return wrong


def check_absmax_quantize(fn, layer=None) -> bool:
    """Check ``fn(w, bits) -> (codes, scales)``: per-row symmetric (absmax) quantization of a 2-D ``w``.

    ``scales`` has one entry per row, ``absmax / (2**(bits-1) - 1)``; ``codes = round(w / scale)``.
    ``layer``: a Linear of the teacher (or its weight), quantized to 8 and 4 bits as two more cases.
    """
    g = torch.Generator().manual_seed(2)
    cases = [(torch.randn(4, 8, generator=g), 8), (torch.randn(16, 64, generator=g) * 0.02, 4),
             (torch.randn(3, 5, generator=g) * 100, 2)]
    labels = [None] * 3
    if layer is not None:
        w, label = _real_layer(layer)
        cases += [(w, 8), (w, 4)]
        labels += [f"{label}, 8 bits", f"{label}, 4 bits"]
    mistakes = [("off by one in the largest code: b bits reach ±(2**(b-1) - 1), so scale = absmax / (2**(b-1) - 1)",
                 _absmax_variant(qmax_of=lambda b: 2 ** (b - 1), clamp=False)),
                ("one scale for the whole tensor: this grid has one scale per row (the max of |w| over dim=1)",
                 _absmax_variant(per_row=False)),
                ("truncated instead of rounded: use torch.round (int() and floor move every value toward -inf or 0)",
                 _absmax_variant(rounding=torch.trunc)),
                ("codes are not rounded: codes = round(w / scale) are integers",
                 _absmax_variant(rounding=lambda x: x))]
    return check("absmax quantization", lambda w, b: _codes_and_scales(fn(w, b)),
                 lambda w, b: _codes_and_scales(absmax_reference(w, b)), cases, atol=1e-6, rtol=1e-5,
                 labels=labels, mistakes=[(h, (lambda v: lambda w, b: _codes_and_scales(v(w, b)))(v))
                                          for h, v in mistakes])


def _group_variant(group=lambda w, g: g, levels=lambda b: 2 ** b - 1, symmetric=False, rounding=torch.round,
                   integer_zero=False, along_columns=False):
    """A wrong group min/max quantizer; ``group(w, g)`` is the group size it really uses."""
    def wrong(w, bits, group_size):
        x = w.double().T if along_columns else w.double()
        rows, cols = x.shape
        size = group(x, group_size)
        xg = x.reshape(-1, size) if size != cols else x  # (groups, size)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = (xg.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
            out = rounding(xg / scale).clamp(-qmax, qmax) * scale
        else:
            lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
            scale = ((hi - lo) / levels(bits)).clamp_min(1e-12)
            if integer_zero:  # the integer zero-point convention: 0.0 is exactly representable
                zero = torch.round(-lo / scale)
                out = (rounding(xg / scale) + zero).clamp(0, 2 ** bits - 1).sub(zero).mul(scale)
            else:
                out = rounding((xg - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo
        out = out.reshape(rows, cols)
        return out.T if along_columns else out
    return wrong


_GROUP_MISTAKES = [
    ("per-tensor instead of per-group: take min and max over each group of group_size consecutive inputs "
     "(w.reshape(rows, -1, group_size)), not over the whole matrix", _group_variant(group=lambda w, g: w.numel())),
    ("per-row instead of per-group: each row holds in_features / group_size groups, each with its own scale",
     _group_variant(group=lambda w, g: w.shape[1])),
    ("levels off by one: b bits give 2**b codes, 0 … 2**b - 1, so step = (max - min) / (2**b - 1)",
     _group_variant(levels=lambda b: 2 ** b)),
    ("zero point rounded to an integer code: this grid keeps the group's minimum exactly, "
     "w_hat = min + step · round((w - min) / step)", _group_variant(integer_zero=True)),
    ("symmetric (absmax) grid: this exercise is the asymmetric min/max grid", _group_variant(symmetric=True)),
    ("truncated instead of rounded: use torch.round, not floor/int()", _group_variant(rounding=torch.floor)),
    ("groups run down the columns: a group is group_size consecutive inputs of one output row",
     _group_variant(along_columns=True)),
]


def _tensor_close(atol: float, rtol: float, ties: float = 1e-3):
    """Equal within tolerance, or off by at most one grid step on at most ``ties`` of the elements (rounding ties)."""
    def compare(got, want, case):
        problem = allclose(got, want, atol, rtol)
        if problem is None or problem.startswith("shape"):
            return problem
        got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
        w, bits, group_size = case
        rows = w.shape[0]
        wg = w.double().reshape(rows, -1, group_size)
        step = ((wg.amax(-1) - wg.amin(-1)) / (2 ** bits - 1)).repeat_interleave(group_size, 1)  # (rows, in)
        off = (got_t - want_t).abs() > atol + rtol * want_t.abs()
        if off.float().mean() <= ties and bool(((got_t - want_t).abs() <= 1.01 * step + atol)[off].all()):
            return None
        return problem
    return compare


def check_group_rtn(fn, layer=None) -> bool:
    """Check ``fn(w, bits, group_size) -> w_hat``: asymmetric min/max round-to-nearest per group of inputs.

    ``layer``: a Linear of the teacher (or its weight), quantized at 4 and 3 bits, groups of 64.
    Rounding ties (a value exactly between two levels) may go either way on a few elements.
    """
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(4, 16, generator=g), 4, 8), (torch.randn(8, 64, generator=g) * 0.05 + 0.02, 3, 32),
             (torch.randn(2, 12, generator=g), 8, 12), (torch.randn(6, 48, generator=g) * 3, 2, 16)]
    labels = [None] * len(cases)
    if layer is not None:
        w, label = _real_layer(layer)
        cases += [(w, 4, 64), (w, 3, 64)]
        labels += [f"{label}, 4 bits, groups of 64", f"{label}, 3 bits, groups of 64"]
    compare = _tensor_close(1e-5, 1e-4)
    return check("group-wise RTN (min/max)", fn, group_rtn_reference, cases, labels=labels,
                 mistakes=_GROUP_MISTAKES, compare=compare)


def check_minmax_group_fake_quant(fn, layer=None) -> bool:
    """The former name of :func:`check_group_rtn`."""
    return check_group_rtn(fn, layer)


def check_sqnr(fn, layer=None) -> bool:
    """Check ``fn(w, w_hat) -> float``: signal-to-quantization-noise ratio in dB (also on a teacher layer at 4 bits)."""
    g = torch.Generator().manual_seed(4)
    cases, labels = [], []
    for scale in (0.1, 0.01, 1e-4):
        w = torch.randn(32, 32, generator=g)
        cases.append((w, w + scale * torch.randn(32, 32, generator=g)))
        labels.append(None)
    if layer is not None:
        w, label = _real_layer(layer)
        cases.append((w, fake_quantize(w, 4, 64, symmetric=True)))
        labels.append(f"{label} against its int4 g64 version")

    def ratio(w, w_hat):
        return w.double().pow(2).sum() / (w.double() - w_hat.double()).pow(2).sum()

    mistakes = [("20·log10: Σw² / Σ(w - ŵ)² is already a ratio of powers, so it takes 10·log10",
                 lambda w, w_hat: 20 * math.log10(ratio(w, w_hat))),
                ("inverted: signal over noise, Σw² / Σ(w - ŵ)², not noise over signal",
                 lambda w, w_hat: -10 * math.log10(ratio(w, w_hat))),
                ("not in dB: take 10·log10 of the power ratio", lambda w, w_hat: float(ratio(w, w_hat))),
                ("natural log: decibels use log10", lambda w, w_hat: 10 * math.log(ratio(w, w_hat)))]
    return check("SQNR", fn, lambda w, w_hat: sqnr_db(w, w_hat), cases, atol=1e-3, rtol=1e-4, labels=labels,
                 mistakes=mistakes)


# ---------------------------------------------------------------------------------------- the lab


def absmax_fake_quant(absmax_quantize):
    """``w -> codes · scales`` from a per-row absmax quantizer ``(w, bits) -> (codes, scales)``."""
    def quantize(w, bits, group_size=None):
        codes, scales = absmax_quantize(w, bits)
        return torch.as_tensor(codes).float() * torch.as_tensor(scales).float().reshape(-1, 1)
    return quantize


def fake_quant_perplexities(model, quantize, settings, perplexity, name: str, reference) -> dict:
    """Perplexity of ``model`` with every block Linear replaced by ``quantize(w, bits, group_size)``, per setting.

    ``settings``: ``[(bits, group_size), ...]``; ``perplexity(model) -> float``. The learner's
    ``quantize`` falls back to ``reference`` when not attempted. Returns
    ``{"ppl": {(bits, group_size): ppl}, "by": "yours" | "reference"}``; the model is restored afterwards.
    """
    fn = yours_or_reference(quantize, reference, name)
    out = {}
    for bits, group_size in settings:
        with weights_replaced(model, lambda _, w: fn(w, bits, group_size)):
            out[(bits, group_size)] = perplexity(model)
    return {"ppl": out, "by": fn.label}


def package_absmax(w, bits, group_size=None):
    """The package's per-row symmetric fake quantization (the reference of ``absmax_fake_quant``)."""
    return fake_quantize(w, bits, None, symmetric=True)


def layer_sqnr(weight: torch.Tensor, sqnr, group_rtn, settings) -> dict:
    """SQNR (dB) of one weight quantized by the learner's ``group_rtn``, measured by the learner's ``sqnr``.

    Returns ``{"db": {(bits, group_size): dB}, "package": {...}, "by": ...}``: the package's numbers are
    ``sqnr_db`` of ``fake_quantize`` on the same grids.
    """
    sqnr = yours_or_reference(sqnr, lambda w, w_hat: sqnr_db(w, w_hat), "my_sqnr")
    rtn = yours_or_reference(group_rtn, group_rtn_reference, "my_group_rtn")
    w = weight.detach().float().cpu()
    mine = {(b, g): float(sqnr(w, torch.as_tensor(rtn(w, b, g)).float())) for b, g in settings}
    package = {(b, g): sqnr_db(w, group_rtn_reference(w, b, g)) for b, g in settings}
    return {"db": mine, "package": package, "by": label_of(sqnr, rtn)}
