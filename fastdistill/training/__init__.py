"""Training with fastdistill: a reference distillation loop, teacher-logit caching, YAML configs, the demo, and
methods for distilling from a noisy teacher.

- :class:`DistillationLoop` (``loop.py``): student + K teachers (or a cache), ``kd_loss``, feature terms,
  gradient accumulation with ``num_items`` normalisation, AMP, logs, checkpoint/resume, DDP.
- :func:`write_teacher_cache` / :class:`TeacherLogitCache` (``cache.py``): teacher logits on disk (full or top-k).
- :class:`TrainConfig` (``config.py``): every option of ``fastdistill train --config file.yaml``.
- ``demo.py``: ``fastdistill demo`` (``make demo``), ensemble distillation on scikit-learn's digits.
- ``noisy_teacher.py``: weighted distillation, SLaM, robust active distillation (teacher reliability fitted on a
  validation set).
"""

from .cache import TeacherLogitCache, topk_to_logits, write_teacher_cache
from .data import ArrayDataset
from .loop import DistillationLoop, FeatureTerm, init_distributed, seed_everything, torch_threads
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

__all__ = [
    "ArrayDataset",
    "DistillationLoop",
    "FeatureTerm",
    "TeacherLogitCache",
    "init_distributed",
    "seed_everything",
    "torch_threads",
    "topk_to_logits",
    "write_teacher_cache",
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
]
