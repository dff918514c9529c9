"""The one place where the exercises import the package's techniques.

Issue 13 moves ``distill``, ``quantize`` and ``prune`` into subpackages; only these lines change then.
Everything else in ``distill_lab.exercises`` imports the references from here or uses ``import distill_lab``.
"""

from ..distill import DistillationLoss, TopKLogits  # noqa: F401
from ..prune import nm_mask, unstructured_mask  # noqa: F401
from ..quantize import fake_quantize, quantize_tensor, sqnr_db  # noqa: F401
