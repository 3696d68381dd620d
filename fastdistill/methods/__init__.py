"""Published distillation methods, each a small component that works with :func:`fastdistill.kd_loss` and the
reference loop (:class:`fastdistill.training.DistillationLoop`).

- ``noisy_teacher.py``: a noisy teacher labelling an unlabelled pool: weighted distillation (:class:`WeightedKDLoss`),
  SLaM (:class:`SLaMLoss`), robust active distillation (:func:`active_distillation`), all from the teacher's
  reliability fitted on a validation set (:class:`TeacherReliability`). Docs: ``docs/noisy_teacher.md``.
- ``weak_teacher.py``: distillation from a weaker teacher, with a decaying soft-label weight
  (:class:`WeakTeacherKDLoss`, :class:`SoftWeightSchedule`). Docs: ``docs/lm_methods.md``.
- ``init.py``: :func:`init_student_from_teacher`: GUIDE (PCA embeddings, evenly spaced heads/neurons) or parameter
  remapping from a smaller teacher. Docs: ``docs/lm_methods.md``.

Ensemble-then-distill and the union of teachers are :func:`fastdistill.kd_loss`'s ``ensemble=`` (with
:func:`fastdistill.ensemble_soft_targets`); co-training with co-distillation is
``DistillationLoop(a, [b], train_teachers=True, loss=fastdistill.CodistillLoss(...))``.
"""

from .init import init_student_from_teacher
from .noisy_teacher import (
    IsotonicCalibrator,
    RobustActiveSampler,
    SLaMLoss,
    TeacherReliability,
    WeightedKDLoss,
    active_distillation,
    distillation_weights,
    robust_sampling_distribution,
    slam_loss,
    slam_mix,
    topk_mask,
)
from .weak_teacher import SoftWeightSchedule, WeakTeacherKDLoss, weak_teacher_kd_loss

__all__ = [
    "IsotonicCalibrator",
    "RobustActiveSampler",
    "SLaMLoss",
    "TeacherReliability",
    "WeightedKDLoss",
    "active_distillation",
    "distillation_weights",
    "robust_sampling_distribution",
    "slam_loss",
    "slam_mix",
    "topk_mask",
    "SoftWeightSchedule",
    "WeakTeacherKDLoss",
    "weak_teacher_kd_loss",
    "init_student_from_teacher",
]
