"""``nn.Module`` wrappers of :mod:`fastdistill.functional`: hyper-parameters in ``__init__``, tensors in ``forward``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import functional as F


class KDLoss(nn.Module):
    """Fused distillation loss; see :func:`fastdistill.kd_loss` for every argument.

    Example::

        loss_fn = KDLoss(temperature=2.0, ce_weight=0.1)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        scale_by_temperature_sq: bool = True,
        ensemble: str = "prob_mean",
        teacher_weights: Tensor | Sequence[float] | None = None,
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        F.check_hyperparameters(
            divergence=divergence, temperature=temperature, ensemble=ensemble, beta=beta, skew=skew,
            ce_weight=ce_weight, reduction=reduction, backend=backend, ignore_index=ignore_index,
            scale_by_temperature_sq=scale_by_temperature_sq,
        )  # fmt: skip
        self.divergence = divergence
        self.temperature = temperature
        self.scale_by_temperature_sq = scale_by_temperature_sq
        self.ensemble = ensemble
        self.teacher_weights = teacher_weights
        self.beta = beta
        self.skew = skew
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: F.TeacherLogits,
        labels: Tensor | None = None,
        *,
        sample_weight: Tensor | None = None,
        teacher_weights: Tensor | Sequence[float] | None = None,
        num_items: int | Tensor | None = None,
    ) -> Tensor:
        """student_logits [*, V]; teacher_logits [*, V], [K, *, V] or K x [*, V]; labels int64 [*].
        ``teacher_weights`` here overrides the one given at construction."""
        return F.kd_loss(
            student_logits, teacher_logits, divergence=self.divergence, temperature=self.temperature,
            scale_by_temperature_sq=self.scale_by_temperature_sq, ensemble=self.ensemble,
            teacher_weights=self.teacher_weights if teacher_weights is None else teacher_weights,
            beta=self.beta, skew=self.skew, labels=labels, ignore_index=self.ignore_index,
            ce_weight=self.ce_weight, sample_weight=sample_weight, reduction=self.reduction, num_items=num_items,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, ensemble={self.ensemble!r}, "
            f"ce_weight={self.ce_weight}, reduction={self.reduction!r}, backend={self.backend!r}"
        )
