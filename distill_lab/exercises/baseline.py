"""Lab of notebook 00 (baseline): per-token NLL from logits, perplexity, temperature softmax.

The learner writes the three functions; :func:`perplexity_with` and :func:`entropies_with` plug them
into the real teacher, next to the package's harness (``dl.perplexity``, ``temperature_view``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime import device_of
from ._check import check, label_of, yours_or_reference

__all__ = ["check_perplexity", "check_temperature_softmax", "check_token_nll", "entropies_with",
           "perplexity_reference", "perplexity_with", "temperature_reference", "token_nll_reference"]


def token_nll_reference(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (nats), shape (B, T-1): position t predicts token t+1 (``dl.perplexity``'s rule)."""
    logits = logits[:, :-1].double()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                           reduction="none").reshape(input_ids.shape[0], -1)


def perplexity_reference(nll: torch.Tensor) -> torch.Tensor:
    return nll.double().mean().exp()


def temperature_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def _nll_variant(shift_logits, shift_ids, transform):
    def wrong(logits, input_ids):
        logp = transform(logits.double())
        return -logp[:, shift_logits].gather(-1, input_ids[:, shift_ids, None])[..., 0]
    return wrong


_ALL, _BUT_LAST, _BUT_FIRST = slice(None), slice(None, -1), slice(1, None)
_NLL_MISTAKES = [
    ("not shifted: the logits at position t predict the *next* token, so score logits[:, :-1] "
     "against input_ids[:, 1:] (T-1 scored tokens per window)",
     _nll_variant(_ALL, _ALL, lambda z: torch.log_softmax(z, -1))),
    ("shifted the wrong way: logits[:, :-1] go with input_ids[:, 1:], not logits[:, 1:] with input_ids[:, :-1]",
     _nll_variant(_BUT_FIRST, _BUT_LAST, lambda z: torch.log_softmax(z, -1))),
    ("probabilities instead of log-probabilities: take log_softmax, not softmax",
     _nll_variant(_BUT_LAST, _BUT_FIRST, lambda z: torch.softmax(z, -1))),
    ("normalised over the wrong dimension: the softmax runs over the vocabulary (dim=-1), not the positions",
     _nll_variant(_BUT_LAST, _BUT_FIRST, lambda z: torch.log_softmax(z, 1))),
    ("sign: the negative log-likelihood is minus the log-probability (it is >= 0)",
     lambda z, ids: -_nll_variant(_BUT_LAST, _BUT_FIRST, lambda x: torch.log_softmax(x, -1))(z, ids)),
    ("base 2: perplexity uses natural logarithms (nats); log2 gives bits",
     _nll_variant(_BUT_LAST, _BUT_FIRST, lambda z: torch.log_softmax(z, -1) / math.log(2))),
]


def check_token_nll(fn, logits: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> bool:
    """Check ``fn(logits (B, T, V), input_ids (B, T)) -> (B, T-1)`` per-token NLL (and on the teacher's logits)."""
    g = torch.Generator().manual_seed(5)
    cases, labels = [], []
    for b, t, v, s in ((1, 5, 7, 1.0), (2, 9, 30, 3.0), (3, 4, 50, 8.0)):
        cases.append((torch.randn(b, t, v, generator=g) * s, torch.randint(0, v, (b, t), generator=g)))
        labels.append(f"random ({b}, {t}, {v}) logits")
    if logits is not None:
        cases.append((logits.detach().float().cpu(), input_ids.detach().cpu()))
        labels.append(f"the teacher's logits {tuple(logits.shape)}")
    return check("per-token NLL", fn, token_nll_reference, cases, atol=1e-4, rtol=1e-4, labels=labels,
                 mistakes=_NLL_MISTAKES)


def check_perplexity(fn, nll: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                     input_ids: torch.Tensor | None = None) -> bool:
    """Check ``fn(nll)``: perplexity from a 1-D tensor of per-token negative log-likelihoods (nats).

    The teacher's own NLLs make one more case: pass them as ``nll``, or its ``logits`` and ``input_ids``.
    """
    if nll is None and logits is not None:
        nll = token_nll_reference(logits.detach().float().cpu(), input_ids.detach().cpu())
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(n, generator=g) * 6,) for n in (1, 7, 300)] + [(torch.full((5,), 2.0),)]
    labels = [None] * len(cases)
    if nll is not None:
        cases.append((nll.detach().double().cpu().reshape(-1),))
        labels.append(f"the teacher's {nll.numel()} token NLLs")
    mistakes = [("exponentiated each token, then averaged: perplexity is exp(mean NLL), not mean(exp(NLL))",
                 lambda x: x.double().exp().mean()),
                ("summed instead of averaged: exp(sum) grows with the number of tokens; use the mean",
                 lambda x: x.double().sum().exp()),
                ("base 2: the NLLs are in nats, so the perplexity is e**mean, not 2**mean",
                 lambda x: 2 ** x.double().mean()),
                ("forgot the exp: mean NLL is the cross-entropy; perplexity is its exponential",
                 lambda x: x.double().mean())]
    return check("perplexity", fn, perplexity_reference, cases, atol=1e-6, rtol=1e-5, labels=labels,
                 mistakes=mistakes)


def _naive_softmax(z, t):
    e = (z.double() / t).float().exp()  # float32, like a learner's tensor: overflows past ~88
    return (e / e.sum(-1, keepdim=True)).double()


def check_temperature_softmax(fn, logits: torch.Tensor | None = None) -> bool:
    """Check ``fn(logits, temperature)``: softmax of logits / T along the last dimension (and on the teacher's)."""
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(10, generator=g) * 5, t) for t in (0.5, 1.0, 2.0)]
    cases.append((torch.randn(3, 50, generator=g) * 20, 4.0))  # batched
    cases.append((torch.randn(2, 6, generator=g) * 10 + 120, 0.5))  # large logits: exp overflows in float32
    labels = [None] * len(cases)
    if logits is not None:
        for t in (0.5, 2.0):
            cases.append((logits.detach().float().cpu(), t))
            labels.append(f"the teacher's next-token logits, T={t}")
    mistakes = [("multiplied by the temperature: the logits are divided by T (T > 1 flattens)",
                 lambda z, t: torch.softmax(z.double() * t, -1)),
                ("temperature ignored: divide the logits by T before the softmax",
                 lambda z, t: torch.softmax(z.double(), -1)),
                ("normalised along the wrong dimension: the probabilities of each row (dim=-1) sum to 1",
                 lambda z, t: torch.softmax(z.double() / t, 0)),
                ("overflow: exp of a large logit is inf; subtract each row's maximum before exponentiating",
                 _naive_softmax)]
    return check("temperature softmax", fn, temperature_reference, cases, atol=1e-6, rtol=1e-5, labels=labels,
                 mistakes=mistakes)


# ---------------------------------------------------------------------------------------- the lab


@torch.no_grad()
def perplexity_with(model, windows: torch.Tensor, token_nll, perplexity, batch_size: int = 2) -> dict:
    """Perplexity of ``model`` on ``windows`` computed by the learner's two functions from the model's logits.

    Returns ``{"ppl", "tokens", "by"}``; ``by`` says whether the learner's functions ran or the reference
    (an exercise not attempted yet).
    """
    token_nll = yours_or_reference(token_nll, token_nll_reference, "my_token_nll")
    perplexity = yours_or_reference(perplexity, perplexity_reference, "my_perplexity")
    device = device_of(model)
    nll = []
    for batch in windows.split(batch_size):  # a few windows at a time: (B, T, 49152) logits are large
        logits = model(batch.to(device)).logits.float().cpu()  # (B, T, V)
        nll.append(torch.as_tensor(token_nll(logits, batch)).double().reshape(-1))
    nll = torch.cat(nll)
    ppl = float(perplexity(nll))
    return {"ppl": ppl, "tokens": nll.numel(), "by": label_of(token_nll, perplexity)}


def entropies_with(temperature_softmax, logits: torch.Tensor, temperatures) -> dict:
    """Entropy (bits) of the learner's ``softmax(logits / T)`` on one next-token distribution, per temperature.

    Returns ``{"bits": {T: entropy}, "by": "yours" | "reference"}``.
    """
    softmax = yours_or_reference(temperature_softmax, temperature_reference, "my_temperature_softmax")
    bits = {}
    for t in temperatures:
        p = torch.as_tensor(softmax(logits.float(), t)).double().clamp_min(1e-30)
        bits[t] = float(-(p * p.log2()).sum())
    return {"bits": bits, "by": softmax.label}
