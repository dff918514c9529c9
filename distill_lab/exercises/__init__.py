"""The notebooks' labs: checks with mistake hints, the plumbing that applies a learner's function to the
teacher, and the student versions of the lessons (``student``). One module per lesson; the references
live here, not in the notebooks.
"""

from ._check import compare_guess, yours_or_reference

__all__ = ["compare_guess", "yours_or_reference"]
