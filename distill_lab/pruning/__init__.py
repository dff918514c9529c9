"""Pruning that is honest about bytes and time: unstructured, N:M (2:4) and structured.

* ``masks``: keep-masks and scores of one weight matrix (magnitude, Wanda, N:M); pure tensors.
* ``selection``: which Linear layers a pass prunes (``filter_fn``) and its calibration batches.
* ``unstructured``: ``MagnitudeConfig`` / ``WandaConfig`` and ``prune_``, the in-place entry point
  (it takes a ``StructuredConfig`` too).
* ``structured``: ``StructuredConfig``, importance scores, Block Influence and the smaller rebuild.
* ``healing``: ``heal`` (distil the pruned model back toward the teacher) and ``kl_to_teacher``.
* ``sparse_storage``: what zeros cost and save: sparse files, CSR and 2:4 layers.

Lesson views live in ``distill_lab.views.pruning``, speed comparisons in ``distill_lab.speed.pruning``.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "healing": ["heal", "kl_to_teacher"],
    "masks": ["GRANULARITIES", "is_nm_sparse", "magnitude_scores", "nm_mask", "unstructured_mask", "wanda_scores"],
    "selection": ["DEFAULT_EXCLUDE", "default_filter", "exclude_globs", "prunable_linears"],
    "sparse_storage": ["CSRLinear", "STORAGE_FORMATS", "load_sparse", "save_sparse",
                       "semi_structured_available", "sparse_bytes", "sparse_bytes_on_disk", "sparsity_stats",
                       "to_semi_structured_", "to_sparse_csr_"],
    "structured": ["HEAD_GRANULARITIES", "IMPORTANCE_METRICS", "StructuredConfig", "block_influence", "importance",
                   "prune_channels", "prune_heads", "prune_layers", "prune_structured", "prune_structured_"],
    "unstructured": ["MagnitudeConfig", "WandaConfig", "input_norms", "prune_"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
