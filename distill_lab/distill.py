# shim for the issue-13 move; removed when the restructure is merged
"""Former home of knowledge distillation; the code now lives in ``distill_lab.distillation`` and
``distill_lab.views.distillation``. This module only re-exports the names that were imported from it."""

from .distillation import (IGNORE_INDEX, KINDS, DistillationLoss, DistillationTrainer,  # noqa: F401
                           HiddenStateLoss, SequenceData, TeacherCache, TopKLogits, TrainConfig,
                           cache_teacher_logits, distributed_context, divergence_reference,
                           final_val_ppl, generate_distillation_data, lr_factor, shift_labels,
                           topk_fidelity)
from .views.distillation import distillation_view  # noqa: F401

__all__ = ["IGNORE_INDEX", "KINDS", "DistillationLoss", "DistillationTrainer", "HiddenStateLoss",
           "SequenceData", "TeacherCache", "TopKLogits", "TrainConfig", "cache_teacher_logits",
           "distillation_view", "distributed_context", "divergence_reference", "final_val_ppl",
           "generate_distillation_data", "lr_factor", "shift_labels", "topk_fidelity"]
