"""Training with fastdistill: the reference distillation loop's machinery.

- :class:`DistillationLoop` (``loop.py``): student + K teachers (or a cache), ``kd_loss``, feature terms,
  gradient accumulation with ``num_items`` normalisation, AMP, logs, checkpoint/resume, DDP. Co-training with
  co-distillation: ``DistillationLoop(a, [b], train_teachers=True, loss=CodistillLoss(...))``.
- :class:`ArrayDataset` and the batch conventions (``data.py``); checkpoints without pickle (``checkpoint.py``).
- :func:`write_teacher_cache` / :class:`TeacherLogitCache` (``cache.py``): teacher logits on disk (full or top-k).
- :class:`TrainConfig` (``config.py``): every option of ``fastdistill train --config file.yaml``.

The published methods live in :mod:`fastdistill.methods` (noisy teacher, weak teacher, GUIDE / remapping
initialisation) and the demo in :mod:`fastdistill.apps`. Their names are re-exported here as before, and the old
module paths (``fastdistill.training.noisy_teacher``, ``.weak_teacher``, ``.init``, ``.demo``) are aliases of the
new modules, so existing imports and configs keep working.
"""

from .. import methods
from ..methods import *  # noqa: F403  (the methods' names, re-exported as before)

# the old module paths: aliases of fastdistill.methods' modules, attributes of this package as they were
from . import init, noisy_teacher, weak_teacher  # noqa: F401
from .cache import TeacherLogitCache, topk_to_logits, write_teacher_cache
from .data import ArrayDataset
from .loop import DistillationLoop, FeatureTerm, init_distributed, seed_everything, torch_threads

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
    *methods.__all__,
]
