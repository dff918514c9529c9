"""Knowledge distillation: the one divergence, cached teacher logits, distillation data, the one training loop.

* ``losses``: ``DistillationLoss`` (forward KL / reverse KL / generalized JSD at a softening
  ``kd_temperature`` with the T² scaling, plus CE; live or top-k teachers), its unchunked autograd form
  ``soft_target_loss``, ``divergence_reference`` (per position), the one KL ``kl_divergence``,
  ``KD_TEMPERATURE`` (the one default), ``HiddenStateLoss``, ``TopKLogits``.
* ``cache``: ``TeacherCache``, ``cache_teacher_logits``, ``topk_fidelity``.
* ``data``: ``SequenceData``, ``generate_distillation_data`` (sequence-level KD), ``shift_labels``.
* ``train_config``: ``TrainConfig`` (how a run trains), ``SCHEDULES``, ``SAMPLINGS``.
* ``trainer``: ``lr_factor``, ``DistillationTrainer`` (also what ``pruning.heal`` and
  ``quantization.qat.train_qat`` run), ``distributed_context``, ``final_val_ppl``.
* ``budget``: ``budget_curve`` (a run's ratio against training tokens), ``fit_power_law``.
* ``on_policy``: on-policy distillation (GKD, ``TrainConfig.lmbda``): ``sample_continuations``,
  ``generated_labels``, ``is_on_policy_step``, ``on_policy_divergence``, ``on_policy_summary``.

The lesson's view of one position under the loss is ``distill_lab.views.distillation.distillation_view``.
"""

from .budget import budget_curve, fit_power_law
from .cache import TeacherCache, cache_teacher_logits, topk_fidelity
from .data import SequenceData, generate_distillation_data, shift_labels
from .losses import (IGNORE_INDEX, KD_TEMPERATURE, KINDS, DistillationLoss, HiddenStateLoss, TopKLogits,
                     divergence_reference, kl_divergence, soft_target_loss)
from .on_policy import (generated_labels, is_on_policy_step, on_policy_divergence, on_policy_summary,
                        sample_continuations)
from .train_config import SAMPLINGS, SCHEDULES, TrainConfig
from .trainer import DistillationTrainer, NonFiniteLossError, distributed_context, final_val_ppl, lr_factor

__all__ = ["IGNORE_INDEX", "KD_TEMPERATURE", "KINDS", "SAMPLINGS", "SCHEDULES", "DistillationLoss", "DistillationTrainer",
           "HiddenStateLoss", "NonFiniteLossError", "SequenceData", "TeacherCache", "TopKLogits", "TrainConfig",
           "budget_curve", "cache_teacher_logits", "fit_power_law", "distributed_context", "divergence_reference",
           "final_val_ppl",
           "generate_distillation_data", "generated_labels", "is_on_policy_step", "kl_divergence", "lr_factor",
           "on_policy_divergence", "on_policy_summary", "sample_continuations", "shift_labels", "soft_target_loss",
           "topk_fidelity"]
