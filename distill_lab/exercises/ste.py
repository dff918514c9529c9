"""Algorithm lab of notebook 02: the straight-through estimator, written as a ``torch.autograd.Function``.

Quantization-aware training (QAT) computes with quantized weights but keeps training the float ones.
Rounding has a zero derivative almost everywhere, so the gradient would never reach the float weights;
the straight-through estimator (STE; Bengio, Léonard and Courville, 2013, arXiv:1308.3432) uses the
quantized value in the forward pass and treats the quantizer as the identity in the backward pass.
The learner writes the ``Function`` (forward: group-wise asymmetric min/max fake quantization, as
``quantize_tensor`` rounds; backward: the gradient passed straight through) and a few QAT steps run on
the real teacher with it, beside the same loop with the package's ``FakeQuantize``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._check import allclose, check, label_of, yours_or_reference
from ._lab import block_linears
from ._package import DistillationLoss, FakeQuantize, fake_quantize, set_seed

__all__ = ["check_fake_quant_ste", "fake_quant_ste_reference", "ste_qat_lab"]


def fake_quant_ste_reference(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Group-wise asymmetric fake quantization with the straight-through gradient (the package's ``FakeQuantize``)."""
    return FakeQuantize(bits, group_size, symmetric=False)(w)


def _value_and_grad(fn):
    """``(w, bits, g, upstream) -> [forward value, gradient w.r.t. w]`` of ``fn``, flattened into one tensor."""
    def run(w, bits, group_size, upstream):
        x = w.clone().requires_grad_(True)
        out = fn(x, bits, group_size)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            grad = torch.zeros_like(w)  # nothing flows back: the rounding cut the graph
        else:
            (grad,) = torch.autograd.grad(out, x, upstream, allow_unused=True)
            grad = torch.zeros_like(w) if grad is None else grad
        return torch.cat([torch.as_tensor(out).detach().double().flatten(), grad.double().flatten()])
    return run


def _ste_variant(no_ste=False, scaled=False, identity_forward=False):
    """A wrong fake-quantizer (rounding in the graph, a gradient scaled by the step, no quantization at all)."""
    def wrong(w, bits, group_size):
        if identity_forward:
            return w * 1.0
        q = fake_quantize(w.detach(), bits, group_size, symmetric=False)
        if no_ste:
            return q  # a constant: no gradient reaches w
        if scaled:
            rows = w.shape[0]
            wg = w.detach().reshape(rows, -1, group_size)
            step = ((wg.amax(-1) - wg.amin(-1)) / (2 ** bits - 1)).repeat_interleave(group_size, 1)
            return q + (w - w.detach()) * step
        return w + (q - w).detach()
    return wrong


_MISTAKES = [
    ("no straight-through gradient: rounding's derivative is 0 almost everywhere, so backward must return the "
     "incoming gradient unchanged (return grad_output, None, None)", _ste_variant(no_ste=True)),
    ("the gradient is scaled by the step: the straight-through estimator passes the gradient as it is",
     _ste_variant(scaled=True)),
    ("the forward pass does not quantize: it must return the dequantized grid values (min + step · code)",
     _ste_variant(identity_forward=True)),
]


def check_fake_quant_ste(fn, layer=None) -> bool:
    """Check ``fn(w, bits, group_size) -> w_hat``: its value (group-wise min/max RTN) and its gradient (straight through).

    ``layer``: a teacher Linear (or its weight), as one more case at 4 bits, groups of 64.
    """
    g = torch.Generator().manual_seed(16)
    cases = [(torch.randn(4, 16, generator=g), 4, 8, torch.randn(4, 16, generator=g)),
             (torch.randn(6, 64, generator=g) * 0.05, 3, 32, torch.randn(6, 64, generator=g)),
             (torch.randn(2, 12, generator=g), 8, 12, torch.ones(2, 12))]
    labels = [None] * 3
    if layer is not None:
        w = (layer.weight if hasattr(layer, "weight") else layer).detach().float().cpu()
        cases.append((w, 4, 64, torch.randn(w.shape, generator=g)))
        labels.append(f"the teacher's weight {tuple(w.shape)}, 4 bits, groups of 64")

    def compare(got, want, case):  # the value may differ by one step at a rounding tie; the gradient may not
        n = case[0].numel()
        problem = allclose(got[n:], want[n:], 1e-6, 1e-5)
        if problem:
            return f"the gradient is wrong: {problem}"
        w, bits, group_size = case[:3]
        step = ((w.reshape(w.shape[0], -1, group_size).amax(-1) - w.reshape(w.shape[0], -1, group_size).amin(-1))
                / (2 ** bits - 1)).repeat_interleave(group_size, 1).double().flatten()
        off = (got[:n] - want[:n]).abs() > 1e-5 + 1e-4 * want[:n].abs()
        if off.double().mean() <= 1e-3 and bool(((got[:n] - want[:n]).abs() <= 1.01 * step + 1e-6)[off].all()):
            return None
        return f"the quantized value is wrong: {allclose(got[:n], want[:n], 1e-5, 1e-4)}"

    return check("straight-through fake quantization", _value_and_grad(fn), _value_and_grad(fake_quant_ste_reference),
                 cases, labels=labels, compare=compare,
                 mistakes=[(h, _value_and_grad(v)) for h, v in _MISTAKES])


class _FakeQuantLinear(nn.Module):
    """A Linear that computes with ``quantize(weight)`` and trains the float weight."""

    def __init__(self, linear: nn.Linear, quantize, bits: int, group_size: int):
        super().__init__()
        self.weight, self.bias, self.quantize, self.bits, self.group_size = \
            linear.weight, linear.bias, quantize, bits, group_size

    def forward(self, x):
        return F.linear(x, self.quantize(self.weight, self.bits, self.group_size), self.bias)


def _qat_losses(teacher, windows, quantize, steps, bits, group_size, lr, seed) -> list[float]:
    """``steps`` Adam steps of KD from ``teacher`` into a fake-quantized copy of it; the loss of each step."""
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for name, linear in block_linears(student).items():
        parent, attr = student.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        linear.weight.requires_grad_(True)
        params.append(linear.weight)
        setattr(parent, attr, _FakeQuantLinear(linear, quantize, bits, group_size))
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = DistillationLoss(alpha=1.0)
    set_seed(seed)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    losses = []
    for step in range(steps):
        batch = windows[order[step % len(order)]][None]  # (1, T)
        with torch.no_grad():
            t_logits = teacher(batch).logits
        loss = loss_fn(student(batch).logits, t_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def ste_qat_lab(teacher: nn.Module, windows: torch.Tensor, fake_quant_ste, steps: int = 4, bits: int = 4,
                group_size: int = 64, lr: float = 1e-5, seed: int = 0) -> dict:
    """A few QAT steps on copies of the teacher: the learner's STE and the package's ``FakeQuantize``, same data.

    Every block Linear computes with its fake-quantized weight (int``bits``, groups of ``group_size``) and
    the float weights train by KD from the fp32 teacher, one window per step. Returns
    ``{"yours", "package", "by"}``: the two loss curves (equal when the learner's STE is right).
    """
    fn = yours_or_reference(fake_quant_ste, fake_quant_ste_reference, "my_fake_quant_ste")
    mine = _qat_losses(teacher, windows, fn, steps, bits, group_size, lr, seed)
    package = _qat_losses(teacher, windows, fake_quant_ste_reference, steps, bits, group_size, lr, seed)
    return {"yours": mine, "package": package, "by": label_of(fn)}
