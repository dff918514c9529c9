"""The shared exercise harness: run a learner's function on fixed cases and compare it to a reference."""

from __future__ import annotations

import torch


class NotAttempted(Exception):
    """Raised by ``check`` internally when the learner's function still raises NotImplementedError."""


def check(name: str, fn, reference, cases, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Compare ``fn(*case)`` with ``reference(*case)`` on every case; print the verdict and return True on success.

    A function that still raises ``NotImplementedError`` is reported as not attempted (and returns
    False) so that a fresh notebook runs top to bottom; a wrong answer raises ``AssertionError``
    with the first failing case.
    """
    for i, case in enumerate(cases):
        try:
            got = fn(*case)
        except NotImplementedError:
            print(f"{name}: not attempted yet - replace `raise NotImplementedError` with your code and rerun.")
            return False
        want = reference(*case)
        got_t = torch.as_tensor(got, dtype=torch.float64)
        want_t = torch.as_tensor(want, dtype=torch.float64)
        if got_t.shape != want_t.shape:
            raise AssertionError(f"{name}: case {i}: shape {tuple(got_t.shape)}, expected {tuple(want_t.shape)}")
        if not torch.allclose(got_t, want_t, atol=atol, rtol=rtol):
            err = (got_t - want_t).abs().max().item()
            raise AssertionError(f"{name}: case {i}: max abs error {err:.3g} (allowed {atol:g} + {rtol:g}·|expected|)")
    print(f"{name}: correct on all {len(cases)} cases.")
    return True
