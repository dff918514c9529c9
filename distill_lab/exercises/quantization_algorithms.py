"""Algorithm labs of notebook 02: the learner writes SmoothQuant's scale migration and GPTQ's column update.

* **SmoothQuant** (Xiao et al., 2023, arXiv:2211.10438). Linears that read one normalised input share a
  per-input-channel scale ``s_j = max|X_j|^α / max_i |W_ij|^(1-α)``; the weights' column ``j`` is
  multiplied by ``s_j`` and the RMSNorm gain divided by it, so the float model computes the same
  function while the activations lose their outliers. :func:`check_smooth_group` checks the learner's
  fold, :func:`check_w8a8_matmul` their simulated W8A8 product, and :func:`smoothing_lab` applies both
  to the real teacher's attention and MLP inputs, beside the package's ``smooth_``.
* **GPTQ** (Frantar et al., 2023, arXiv:2210.17323). Round one input column at a time and spread its
  error over the columns not yet rounded with the upper Cholesky factor of the damped inverse Hessian
  ``(XᵀX + λI)⁻¹``. :func:`check_gptq_layer` checks the learner's version against
  ``quantization.gptq.gptq_quantize_weight``; :func:`gptq_layer_errors` scores it on a teacher layer by
  the output error ``‖X(W - Ŵ)ᵀ‖² / ‖XWᵀ‖²`` (written with the Hessian: ``tr(Δ H Δᵀ) / tr(W H Wᵀ)``).
"""

from __future__ import annotations

import torch

from ._check import allclose, check, label_of, yours_or_reference
from ._package import fake_quantize, gptq_quantize_weight

__all__ = ["SCALE_FLOOR", "UNDAMPED", "best_alpha_reference", "check_best_alpha", "check_gptq_layer",
           "check_smooth_group", "check_w8a8_matmul", "gptq_layer_errors",
           "gptq_layer_reference", "layer_output_error", "smooth_group_reference", "smoothing_lab",
           "w8a8_matmul_reference"]

SCALE_FLOOR = 1e-5  # SmoothQuant clamps both ranges and the scale from below, so no channel divides by zero


# ----------------------------------------------------------------------------------------------- SmoothQuant
def smooth_group_reference(norm_weight: torch.Tensor, weights: list, act_absmax: torch.Tensor, alpha: float):
    """SmoothQuant for one group: ``(norm_weight / s, [W * s for W in weights])`` with the shared (K,) scale ``s``."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)  # (K,) over every output row of the group
    s = (act_absmax.clamp_min(SCALE_FLOOR).pow(alpha) / w_max.clamp_min(SCALE_FLOOR).pow(1 - alpha))
    s = s.clamp_min(SCALE_FLOOR)  # (K,)
    return norm_weight / s, [w * s[None, :] for w in weights]


def _smooth_variant(fold_into_norm=False, swap_alpha=False, per_linear=False):
    """A wrong SmoothQuant fold (the side the scale is folded into, the exponent, one scale per Linear)."""
    def wrong(norm_weight, weights, act_absmax, alpha):
        a = 1 - alpha if swap_alpha else alpha

        def scale(ws):
            w_max = torch.stack([w.abs().amax(0) for w in ws]).amax(0)  # (K,)
            s = act_absmax.clamp_min(SCALE_FLOOR).pow(a) / w_max.clamp_min(SCALE_FLOOR).pow(1 - a)
            return s.clamp_min(SCALE_FLOOR)
        if per_linear:
            ss = [scale([w]) for w in weights]
            return norm_weight / ss[0], [w * s[None, :] for w, s in zip(weights, ss)]
        s = scale(weights)
        if fold_into_norm:
            return norm_weight * s, [w / s[None, :] for w in weights]
        return norm_weight / s, [w * s[None, :] for w in weights]
    return wrong


def _flat(result) -> torch.Tensor:
    norm_weight, weights = result
    return torch.cat([torch.as_tensor(norm_weight).double().flatten(),
                      *[torch.as_tensor(w).double().flatten() for w in weights]])


def check_smooth_group(fn, group=None) -> bool:
    """Check ``fn(norm_weight, weights, act_absmax, alpha) -> (norm_weight', [W', ...])``: one SmoothQuant fold.

    ``group``: ``(norm_weight, [weights], act_absmax)`` of the real teacher (e.g. a block's q/k/v), as more cases.
    """
    g = torch.Generator().manual_seed(7)

    def case(k, outs, loud):
        act = torch.rand(k, generator=g) + 0.1
        act[:loud] *= 100  # a few outlier channels, as on the teacher
        return (torch.rand(k, generator=g) + 0.5, [torch.randn(n, k, generator=g) * 0.05 for n in outs], act)

    cases = [(*case(8, [4], 1), 0.5), (*case(16, [8, 4, 4], 2), 0.5), (*case(12, [6, 6], 3), 0.8),
             (*case(6, [3], 0), 0.3)]
    labels = [None] * len(cases)
    if group is not None:
        norm_weight, weights, act = group
        cases.append((norm_weight.detach().float().cpu(), [w.detach().float().cpu() for w in weights],
                      act.detach().float().cpu(), 0.5))
        labels.append(f"the teacher's {len(weights)} Linears reading one RMSNorm, alpha 0.5")
    mistakes = [("you folded the scale into the wrong side: divide the norm's gain by s (the activations shrink) "
                 "and multiply the weights' columns by s", _smooth_variant(fold_into_norm=True)),
                ("alpha on the wrong side: s = max|X|^alpha / max|W|^(1 - alpha) (alpha is the share of the "
                 "activation range moved into the weights)", _smooth_variant(swap_alpha=True)),
                ("one scale per Linear: the Linears read the same input, so they must share one s (take the max "
                 "of |W| over all their output rows)", _smooth_variant(per_linear=True))]
    return check("SmoothQuant fold", lambda *c: _flat(fn(*c)), lambda *c: _flat(smooth_group_reference(*c)), cases,
                 atol=1e-5, rtol=1e-4, labels=labels,
                 mistakes=[(h, (lambda v: lambda *c: _flat(v(*c)))(v)) for h, v in mistakes])


def w8a8_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` as W8A8 computes it: int8 codes per token (x rows) and per output channel (w rows), one rescale."""
    sx = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (T, 1)
    sw = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (N, 1)
    qx, qw = torch.round(x / sx).clamp(-127, 127), torch.round(w / sw).clamp(-127, 127)
    return (qx.double() @ qw.double().T).float() * sx * sw.T  # (T, N)


def _w8a8_variant(x_per_tensor=False, w_per_tensor=False, levels=127, rescale=True):
    """A wrong simulated W8A8 (scale granularity of x or w, the largest code, the missing rescale)."""
    def wrong(x, w):
        sx = x.abs().amax().expand(x.shape[0], 1) if x_per_tensor else x.abs().amax(1, keepdim=True)  # (T, 1)
        sw = w.abs().amax().expand(w.shape[0], 1) if w_per_tensor else w.abs().amax(1, keepdim=True)  # (N, 1)
        sx, sw = (sx / levels).clamp_min(1e-12), (sw / levels).clamp_min(1e-12)
        qx, qw = torch.round(x / sx).clamp(-127, 127), torch.round(w / sw).clamp(-127, 127)
        out = (qx.double() @ qw.double().T).float()  # (T, N) the int32 sums
        return out * sx * sw.T if rescale else out
    return wrong


def check_w8a8_matmul(fn, x=None, w=None) -> bool:
    """Check ``fn(x, w) -> y``: a simulated W8A8 ``x @ wᵀ`` (x (T, K) per-token int8, w (N, K) per-channel int8)."""
    g = torch.Generator().manual_seed(8)
    cases = [(torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)),
             (torch.randn(16, 32, generator=g) * torch.linspace(0.1, 50, 32), torch.randn(8, 32, generator=g) * 0.05)]
    labels = [None, None]
    if x is not None and w is not None:
        cases.append((x.detach().float().cpu(), w.detach().float().cpu()))
        labels.append(f"the teacher's inputs {tuple(x.shape)} and weight {tuple(w.shape)}")
    mistakes = [("one scale for all tokens: W8A8 quantizes activations per token (x.abs().amax(1) per row)",
                 _w8a8_variant(x_per_tensor=True)),
                ("one scale for the whole weight: this W8A8 keeps one scale per output channel (w.abs().amax(1))",
                 _w8a8_variant(w_per_tensor=True)),
                ("int32 sums not rescaled: multiply the integer product by the token scale and the channel scale",
                 _w8a8_variant(rescale=False)),
                ("scale off by one: int8 codes reach ±127, so scale = absmax / 127", _w8a8_variant(levels=128))]
    return check("W8A8 matmul", fn, w8a8_matmul_reference, cases, atol=1e-4, rtol=1e-3, labels=labels,
                 mistakes=mistakes)


def best_alpha_reference(x: torch.Tensor, norm_weight: torch.Tensor, weights: list, act_absmax: torch.Tensor,
                         alphas) -> tuple:
    """``(alpha with the lowest error, [error per alpha])``: the group's W8A8 error after smoothing at each alpha.

    The error of one alpha is Σ over the group's Linears of ``‖W8A8(x / s, W · s) − x Wᵀ‖² / ‖x Wᵀ‖²``.
    """
    errors = []
    for alpha in alphas:
        new_norm, new_ws = smooth_group_reference(norm_weight, weights, act_absmax, alpha)
        x_s = x / (norm_weight / new_norm)  # what the smoothed norm emits
        errors.append(sum(float((w8a8_matmul_reference(x_s, w_s) - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())
                          for w, w_s in zip(weights, new_ws)))
    return alphas[min(range(len(alphas)), key=errors.__getitem__)], errors


def _alpha_variant(unscaled_input=False, worst=False):
    def wrong(x, norm_weight, weights, act_absmax, alphas):
        errors = []
        for alpha in alphas:
            new_norm, new_ws = smooth_group_reference(norm_weight, weights, act_absmax, alpha)
            x_s = x if unscaled_input else x / (norm_weight / new_norm)
            errors.append(sum(float((w8a8_matmul_reference(x_s, w_s) - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())
                              for w, w_s in zip(weights, new_ws)))
        pick = max if worst else min
        return alphas[pick(range(len(alphas)), key=errors.__getitem__)], errors
    return wrong


def check_best_alpha(fn, group=None) -> bool:
    """Check ``fn(x, norm_weight, weights, act_absmax, alphas) -> (best alpha, errors)``; ``group``: a teacher group
    ``(x, norm_weight, [weights], act_absmax)``, as one more case."""
    g = torch.Generator().manual_seed(18)
    cases = []
    for t, k, outs in ((64, 16, [8]), (128, 32, [16, 8])):
        x = torch.randn(t, k, generator=g)
        x[:, 2] *= 60  # an outlier channel
        cases.append((x, torch.rand(k, generator=g) + 0.5, [torch.randn(n, k, generator=g) * 0.05 for n in outs],
                      x.abs().amax(0), [0.0, 0.3, 0.5, 0.7, 0.9]))
    labels = [None, None]
    if group is not None:
        x, norm_weight, weights, act = group
        cases.append((x.float().cpu(), norm_weight.detach().float().cpu(), [w.detach().float().cpu() for w in weights],
                      act.float().cpu(), [0.3, 0.5, 0.7]))
        labels.append(f"the teacher's {len(weights)} Linears reading one RMSNorm")

    def flat(result):
        alpha, errors = result
        return torch.tensor([float(alpha), *[float(e) for e in errors]], dtype=torch.float64)

    mistakes = [("the input is not divided by s: the smoothed norm emits x / s, and that is what W8A8 quantizes",
                 _alpha_variant(unscaled_input=True)),
                ("the largest error picked: keep the alpha whose W8A8 error is lowest", _alpha_variant(worst=True))]
    return check("SmoothQuant alpha", lambda *c: flat(fn(*c)), lambda *c: flat(best_alpha_reference(*c)), cases,
                 atol=1e-6, rtol=1e-3, labels=labels, mistakes=[(h, (lambda v: lambda *c: flat(v(*c)))(v))
                                                                for h, v in mistakes])


def _relative_error(y: torch.Tensor, want: torch.Tensor) -> float:
    return float((y.double() - want.double()).norm() / want.double().norm())


def smoothing_lab(groups: dict, smooth_group, w8a8_matmul, alpha: float = 0.5) -> dict:
    """W8A8 output error of real teacher groups before and after the learner's SmoothQuant, beside the package's.

    ``groups``: ``{name: (norm_weight, [weights], act_absmax, x)}`` with ``x`` (T, K) sampled inputs of the
    group *before* the norm's gain is divided (``x`` already includes the norm's output). Returns
    ``{name: {"plain", "yours", "package", "float_change"}, "by": ...}``: relative output errors of the
    first Linear, and how much the learner's fold changed the float product (should be ~1e-7).
    """
    smooth = yours_or_reference(smooth_group, smooth_group_reference, "my_smooth_group")
    mm = yours_or_reference(w8a8_matmul, w8a8_matmul_reference, "my_w8a8_matmul")
    out = {}
    for name, (norm_weight, weights, act_absmax, x) in groups.items():
        w = weights[0].float()
        exact = x @ w.T  # (T, N)
        new_norm, new_ws = smooth(norm_weight.float(), [v.float() for v in weights], act_absmax.float(), alpha)
        s = norm_weight.float() / torch.as_tensor(new_norm).float()  # the scale the fold divided the gain by
        x_s = x / s  # the activations the smoothed norm would emit
        ref_norm, ref_ws = smooth_group_reference(norm_weight.float(), [v.float() for v in weights],
                                                  act_absmax.float(), alpha)
        s_ref = norm_weight.float() / ref_norm
        out[name] = {"plain": _relative_error(mm(x, w), exact),
                     "yours": _relative_error(mm(x_s, torch.as_tensor(new_ws[0]).float()), exact),
                     "package": _relative_error(w8a8_matmul_reference(x / s_ref, ref_ws[0]), exact),
                     "float_change": _relative_error(x_s @ torch.as_tensor(new_ws[0]).float().T, exact)}
    return {**out, "by": label_of(smooth, mm)}


# ----------------------------------------------------------------------------------------------------- GPTQ
def gptq_layer_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 0.01):
    """GPTQ of one (N, K) weight with its (K, K) Hessian, asymmetric min/max groups, dequantized (the package's)."""
    q = gptq_quantize_weight(w, h, bits=bits, group_size=group_size, symmetric=False, damp=damp)
    return q.dequantize().float()


def _gptq_variant(feedback=True, grid_from_original=False, sign=-1.0, use_hessian=False):
    """A wrong GPTQ (no error feedback, grid from the original weights, feedback sign, H instead of H⁻¹)."""
    def wrong(w, h, bits, group_size, damp=0.01):
        k = w.shape[1]
        w0 = w.double().clone()
        wq = w0.clone()
        hd = h.double().clone()
        hd += damp * torch.diag(hd).mean() * torch.eye(k, dtype=hd.dtype)
        u = torch.linalg.cholesky(hd, upper=True) if use_hessian else \
            torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
        out = torch.zeros_like(wq)
        qmax = 2 ** bits - 1
        for i in range(k):
            if i % group_size == 0:
                src = (w0 if grid_from_original else wq)[:, i:i + group_size]
                lo = src.amin(1)
                scale = ((src.amax(1) - lo) / qmax).clamp_min(1e-8)
            q = torch.round((wq[:, i] - lo) / scale).clamp(0, qmax) * scale + lo
            out[:, i] = q
            if feedback:
                e = (wq[:, i] - q) / u[i, i]
                wq[:, i:] += sign * e[:, None] * u[i, i:][None, :]
        return out.float()
    return wrong


def _quantized_close(atol: float = 1e-4, ties: float = 0.01):
    """Equal within tolerance, or one grid step apart on at most ``ties`` of the weights (a rounding tie can
    flip, and error feedback then moves the columns after it a little)."""
    def compare(got, want, case):
        problem = allclose(got, want, atol, 1e-3)
        if problem is None or problem.startswith("shape"):
            return problem
        got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
        w, _, bits, group_size = case[:4]
        wg = w.double().reshape(w.shape[0], -1, group_size)
        step = ((wg.amax(-1) - wg.amin(-1)) / (2 ** bits - 1)).repeat_interleave(group_size, 1)  # (N, K)
        off = (got_t - want_t).abs() > atol + 1e-3 * want_t.abs()
        if off.double().mean() <= ties and bool(((got_t - want_t).abs() <= 2.5 * step + atol)[off].all()):
            return None
        return problem
    return compare


def check_gptq_layer(fn, layer=None) -> bool:
    """Check ``fn(w, h, bits, group_size, damp) -> w_hat``: GPTQ of one (N, K) weight with its (K, K) Hessian.

    ``layer``: ``(weight, hessian)`` of a teacher Linear, as one more case at 4 bits, groups of 64.
    """
    g = torch.Generator().manual_seed(9)

    def case(n, k, tokens, bits, group):
        x = torch.randn(tokens, k, generator=g) * torch.linspace(0.2, 3.0, k)  # inputs of unequal size
        return (torch.randn(n, k, generator=g) * 0.1, (x.T @ x / tokens).double(), bits, group, 0.01)

    cases = [case(4, 16, 64, 4, 8), case(8, 32, 128, 3, 16), case(6, 24, 12, 4, 8)]  # the last: rank-deficient H
    labels = [None, None, "a Hessian from fewer tokens than inputs (singular without damping)"]
    if layer is not None:
        w, h = layer
        cases.append((w.detach().float().cpu(), h.detach().double().cpu(), 4, 64, 0.01))
        labels.append(f"the teacher's layer {tuple(w.shape)} and its calibration Hessian")
    mistakes = [("no error feedback: after rounding column i, subtract e · U[i, i:] from the columns not yet "
                 "rounded, with e = (w_i - q_i) / U[i, i]; without it GPTQ is round-to-nearest",
                 _gptq_variant(feedback=False)),
                ("the feedback has the wrong sign: the remaining columns move by -e · U[i, i:], against the error",
                 _gptq_variant(sign=1.0)),
                ("the Cholesky factor of H instead of H⁻¹: U is the upper Cholesky factor of the inverse Hessian",
                 _gptq_variant(use_hessian=True)),
                ("each group's grid from the original weights: take min and max when the group's first column is "
                 "reached, from the weights as the feedback has updated them", _gptq_variant(grid_from_original=True))]
    return check("GPTQ on one layer", _factorising(fn), gptq_layer_reference, cases, labels=labels,
                 mistakes=mistakes, compare=_quantized_close(), match=_quantized_close(ties=0.0), match_real=False)


UNDAMPED = ("the Hessian is not damped: add damp · mean(diag H) · I before inverting (H from fewer tokens than "
            "inputs is singular, and the update would trust directions the calibration never saw)")


def _factorising(fn):
    """``fn``, with a failed Cholesky factorisation reported as the missing damping it almost always is."""
    def run(w, h, bits, group_size, damp):
        try:
            return fn(w, h, bits, group_size, damp)
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            if "positive-definite" not in str(err) and "singular" not in str(err):
                raise
            raise AssertionError(f"GPTQ on one layer: the Hessian {tuple(h.shape)} could not be factorised: "
                                 f"{str(err).splitlines()[0]}\n  likely mistake: {UNDAMPED}") from None
    return run


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``‖X(W - Ŵ)ᵀ‖² / ‖XWᵀ‖²`` from the Hessian ``H = XᵀX / n``: ``tr(Δ H Δᵀ) / tr(W H Wᵀ)``."""
    d, wd, hd = (w.double() - w_hat.double()), w.double(), h.double()
    return float(((d @ hd) * d).sum() / ((wd @ hd) * wd).sum())


def gptq_layer_errors(w: torch.Tensor, h: torch.Tensor, gptq, bits: int = 4, group_size: int = 64,
                      damp: float = 0.01) -> dict:
    """Output error of one teacher layer: round-to-nearest, the learner's GPTQ and the package's, same grid.

    Returns ``{"rtn", "yours", "package", "by"}`` (relative squared output errors, see ``layer_output_error``).
    """
    fn = yours_or_reference(gptq, gptq_layer_reference, "my_gptq")
    w, h = w.detach().float().cpu(), h.detach().double().cpu()
    return {"rtn": layer_output_error(w, fake_quantize(w, bits, group_size, symmetric=False), h),
            "yours": layer_output_error(w, torch.as_tensor(fn(w, h, bits, group_size, damp)).float(), h),
            "package": layer_output_error(w, gptq_layer_reference(w, h, bits, group_size, damp), h),
            "by": fn.label}
