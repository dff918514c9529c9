"""The shared exercise harness: compare a learner's function with a reference, name the likely mistake, fall back.

* :func:`check` runs the learner's function on fixed cases (random tensors, plus the real teacher's
  tensors when a lesson passes them), compares every result with the reference, and on a wrong
  answer tries a list of known wrong variants: when the answer matches one on every case, the
  error message names that mistake ("missing T²", "per-tensor instead of per-group", ...).
* :func:`yours_or_reference` lets a lesson plug the learner's function into the real model and still
  run top to bottom when the exercise was not attempted yet (the student version of a notebook):
  the first ``NotImplementedError`` switches to the package's reference, with one printed line.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["allclose", "AUTOGRADE_ENV", "check", "compare_guess", "label_of", "NOT_ATTEMPTED", "not_attempted",
           "yours_or_reference",
           "YoursOrReference"]

NOT_ATTEMPTED = "not attempted yet"
AUTOGRADE_ENV = "NBGRADER_EXECUTION"  # nbgrader sets it to "autograde" while it grades a submission


def not_attempted(name: str) -> bool:
    """Say that the exercise ``name`` is not attempted yet and return False, so the lesson runs on.

    Under nbgrader's autograder (``NBGRADER_EXECUTION=autograde``) raise ``AssertionError`` instead: the check
    cell then fails and its points are not given for an exercise nobody wrote.
    """
    message = f"{name}: {NOT_ATTEMPTED} - replace `raise NotImplementedError()` with your code and rerun."
    if os.environ.get(AUTOGRADE_ENV) == "autograde":
        raise AssertionError(message)
    print(message)
    return False


def _fresh(case: tuple) -> tuple:
    """A copy of a case's tensor arguments, so a function that writes into its inputs cannot change the next call."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in case)


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().to(torch.float64)


def allclose(got, want, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """``None`` when ``got`` equals ``want`` within ``atol + rtol·|want|`` (NaN = NaN); otherwise what differs."""
    got_t, want_t = _as_float64(got), _as_float64(want)
    if got_t.shape != want_t.shape:
        return f"shape {tuple(got_t.shape)}, expected {tuple(want_t.shape)}"
    if torch.allclose(got_t, want_t, atol=atol, rtol=rtol, equal_nan=True):
        return None
    diff = (got_t - want_t).abs()
    err = diff.nan_to_num(float("inf")).max().item() if diff.numel() else 0.0
    return f"max abs error {err:.3g} (allowed {atol:g} + {rtol:g}·|expected|)"


def _is_real(label) -> bool:
    """A case on the real model's tensors: its label names "the teacher's" tensors."""
    return bool(label) and "the teacher's" in label


def _matches(fn, outputs, cases, match) -> bool:
    """True when ``fn`` gives ``outputs`` on every case (a variant that raises matches nothing)."""
    try:
        return all(match(out, fn(*_fresh(case)), case) is None for out, case in zip(outputs, cases))
    except Exception:  # noqa: BLE001 - a wrong variant may not even run on some case
        return False


def check(name: str, fn, reference, cases, atol: float = 1e-5, rtol: float = 1e-4, *,
          labels=None, mistakes=(), compare=None, match=None, match_real: bool = True) -> bool:
    """Compare ``fn(*case)`` with ``reference(*case)`` on every case; print the verdict and return True on success.

    * ``labels``: one short description per case, shown in the error message (a case is numbered when
      it has none); a label that names "the teacher's" tensors marks a case on the real model
      (e.g. ``"the teacher's layers.3.mlp.gate_proj"``), counted in the success line.
    * ``mistakes``: ``[(hint, wrong_fn), ...]``. On a wrong answer, the first variant that gives the
      learner's result on *every* case names the likely mistake in the message.
    * ``compare(got, want, case)``: ``None`` when ``got`` is right, else what is wrong (default:
      :func:`allclose` with ``atol``/``rtol``). ``match`` is the same test used to recognise a
      wrong variant (default: ``compare``). ``match_real=False`` recognises variants on the random
      cases only (for answers that may legitimately differ on the real tensors, e.g. ties in a mask).

    A function that still raises ``NotImplementedError`` is reported as not attempted (and returns
    False) so that a fresh notebook runs top to bottom; a wrong answer raises ``AssertionError``
    with the first failing case.
    """
    cases = list(cases)
    labels = list(labels) if labels is not None else [None] * len(cases)
    if len(labels) != len(cases):
        raise ValueError(f"labels: {len(labels)} given for {len(cases)} cases")
    compare = compare or (lambda got, want, case: allclose(got, want, atol, rtol))
    match = match or compare
    outputs = []
    for case in cases:
        try:
            outputs.append(fn(*_fresh(case)))
        except NotImplementedError:
            return not_attempted(name)
    for i, (case, got) in enumerate(zip(cases, outputs)):
        problem = compare(got, reference(*_fresh(case)), case)
        if problem is None:
            continue
        where = f"case {i}" + (f" ({labels[i]})" if labels[i] else "")
        message = f"{name}: {where}: {problem}"
        kept = [j for j, label in enumerate(labels) if match_real or not _is_real(label)]
        hint = next((h for h, wrong in mistakes
                     if _matches(wrong, [outputs[j] for j in kept], [cases[j] for j in kept], match)), None)
        if hint:
            message += f"\n  likely mistake: {hint}"
        raise AssertionError(message)
    real = [label for label in labels if _is_real(label)]
    what = "a config of the real model" if real and all("config" in label for label in real) else \
        "the teacher's own tensors"
    print(f"{name}: correct on all {len(cases)} cases" + (f", {len(real)} of them on {what}." if real else "."))
    return True


class YoursOrReference:
    """Calls the learner's function; after its first ``NotImplementedError``, the reference instead (said once)."""

    def __init__(self, fn, reference, name: str | None = None):
        if isinstance(fn, YoursOrReference):
            fn = fn.fn
        self.fn, self.reference = fn, reference
        self.name = name or getattr(fn, "__name__", "your function")
        self.fell_back = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if not self.fell_back:
            try:
                return self.fn(*args, **kwargs)
            except NotImplementedError:
                self.fell_back = True
                print(f"{self.name} {NOT_ATTEMPTED}: the next cells use distill_lab's reference")
        return self.reference(*args, **kwargs)

    @property
    def label(self) -> str:
        """``'yours'`` or ``'reference'`` (meaningful once the function has been called)."""
        return "reference" if self.fell_back else "yours"


def yours_or_reference(fn, reference, name: str | None = None) -> YoursOrReference:
    """Wrap a learner's function so that an unattempted exercise falls back to ``reference`` with one printed line."""
    return YoursOrReference(fn, reference, name)


def label_of(*functions: YoursOrReference) -> str:
    """``'yours'`` when every wrapped function ran the learner's code, else ``'reference'``."""
    return "reference" if any(f.fell_back for f in functions) else "yours"


def compare_guess(guess, measured, what: str, fmt: str = "{:.3g}") -> None:
    """Print the learner's guess (``guess()``, a "predict, then run" answer) next to the measured value.

    A number is compared by the factor between the two, a text (e.g. a method's name) by equality.
    An unanswered guess (``NotImplementedError``) prints the measurement and "not attempted yet".
    """
    name = getattr(guess, "__name__", "my_guess")
    shown = (lambda v: str(v)) if isinstance(measured, str) else fmt.format
    try:
        value = guess()
    except NotImplementedError:
        print(f"{name} {NOT_ATTEMPTED}: {what}: measured {shown(measured)}")
        return
    if isinstance(measured, str):
        verdict = "right" if str(value).strip().lower() == measured.strip().lower() else "not this time"
    elif value > 0 and measured > 0:
        factor = max(value, measured) / min(value, measured)
        verdict = "within 10 %" if factor <= 1.1 else f"off by a factor of {factor:.1f}"
    else:
        verdict = f"off by {abs(value - measured):.3g}"
    print(f"{what}: your guess {shown(value)}, measured {shown(measured)} ({verdict})")
