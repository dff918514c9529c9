"""Check a lesson's claims in one readable line: ``✓ forward KL beats CE: 219 < 291``.

A lesson states what it measured with :func:`claim` instead of a bare ``assert``. The line is
printed whether the claim holds or not, so a reader sees the evidence next to the verdict. A
failed quality claim raises :class:`ClaimError` (an ``AssertionError``, so nbval and CI fail on
it). A speed claim passes ``warn=True``: a busy laptop can make any timing lose, so it prints
``⚠`` and does not raise.
"""

from __future__ import annotations

__all__ = ["MARKS", "Claim", "ClaimError", "claim", "verdict"]

MARKS = {True: "✓", False: "✗", None: "within noise"}  # one check: held, did not hold, could not be decided


class ClaimError(AssertionError):
    """A lesson's claim did not hold on this run."""


class Claim:
    """What :func:`claim` returns: true when the claim held. Shows nothing as a cell's last value."""

    __slots__ = ("ok", "text")

    def __init__(self, ok: bool, text: str):
        self.ok, self.text = ok, text

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"Claim({'held' if self.ok else 'did not hold'}: {self.text!r})"

    def _ipython_display_(self) -> None:
        """The line is already printed; a notebook cell ending in ``dl.claim(...)`` adds no ``Out[]``."""


def claim(ok, text: str, *, warn: bool = False) -> Claim:
    """Print ``✓ text`` when ``ok`` holds; otherwise ``⚠ text`` (``warn=True``) or raise ``ClaimError``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r}; allowed: a non-empty string that states the claim")
    ok = bool(ok)
    if ok:
        print(f"✓ {text}")
    elif warn:
        print(f"⚠ {text} (did not hold on this run: a timing, not a failure)")
    else:
        raise ClaimError(f"✗ {text}")
    return Claim(ok, text)


def verdict(checks: dict[str, bool | None]) -> str:
    """Summarise named checks: ``'holds'``, ``'does not hold'`` or ``'partly holds (a ✓, b ✗, c within noise)'``.

    With a ✗ and no ✓ the claim does not hold, whatever is within noise (``'does not hold (a ✗, b within noise)'``);
    only checks that are all within noise, or a mix with a ✓, hold partly.

    A check that is ``None`` could not be decided: a speed whose spread crosses the claim's threshold
    (``timing.SpeedRatio.holds``). The claim then holds only partly, and the line says which check was noise.
    """
    if not checks:
        raise ValueError("checks={}; allowed: at least one named check")
    if any(ok not in (True, False, None) for ok in checks.values()):
        raise ValueError(f"checks={checks}; allowed: True, False or None (within noise) for each")
    if all(ok is True for ok in checks.values()):
        return "holds"
    marks = ", ".join(f"{name} {MARKS[ok]}" for name, ok in checks.items())
    if all(ok is False for ok in checks.values()):
        return "does not hold"
    if not any(ok is True for ok in checks.values()) and any(ok is False for ok in checks.values()):
        return f"does not hold ({marks})"  # a ✗ and nothing held: the checks within noise cannot rescue it
    return f"partly holds ({marks})"
