"""Distillation from a weak teacher (DWT): the teacher is smaller or weaker than the student.

Lee et al., "A Study on Knowledge Distillation from Weak Teacher for Scaling Up Pre-trained Language Models",
Findings of ACL 2023 (arXiv:2305.18239). :func:`weak_teacher_kd_loss` / :class:`WeakTeacherKDLoss`: the paper's
objective ``α_h · CE(labels) + α_s · KL(teacher_τ ‖ student_τ)`` as one fused :func:`fastdistill.kd_loss` call
(``α_h·CE + α_s·c·D = (α_h + α_s) · kd_loss(..., ce_weight=α_h / (α_h + α_s))``, c = T² or 1), with the soft weight
α_s decayed over training by a :class:`SoftWeightSchedule` (the paper recommends decaying it, "e.g., from 4 to 1";
the shapes and the per-step clock are ours).

What is the paper's and what is ours, in detail (the weights they ran, τ, the T² factor, the schedule), and the
experiment: ``docs/lm_methods.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

import fastdistill

from .. import functional

__all__ = ["SHAPES", "SoftWeightSchedule", "WeakTeacherKDLoss", "weak_teacher_kd_loss"]

SHAPES = ("linear", "cosine", "step", "constant")


def _check_weight(name: str, value) -> float:
    """A loss weight: a finite real number >= 0 (TypeError / ValueError naming ``name``)."""
    return functional.check_real(name, value, low=0.0, high=math.inf, low_open=False, high_open=True)


def _check_weight_sum(hard_weight: float, soft_weight: float) -> float:
    """hard_weight + soft_weight, the factor the fused loss is multiplied by: finite (two finite weights near the
    float max sum to inf, which would make ce_weight 0 and the loss inf)."""
    total = hard_weight + soft_weight
    if not math.isfinite(total):
        raise ValueError(f"hard_weight + soft_weight must be finite (the loss is kd_loss(...) times their sum); got "
                         f"{hard_weight!r} + {soft_weight!r} = {total!r}")  # fmt: skip
    return total


_check_int = functional.check_int


@dataclass(frozen=True)
class SoftWeightSchedule:
    """The soft-loss weight α_s as a function of the optimizer step: from ``start`` to ``end``.

    The default 4 → 1 is the paper's example; the shapes are ours (the paper names none, see docs/lm_methods.md).
    With progress p = step / (decay_fraction · total_steps), clamped to [0, 1]:

    - "linear": ``start + (end - start) · p``;
    - "cosine": ``end + (start - end) · (1 + cos(π p)) / 2`` (flat at both ends);
    - "step": ``num_drops + 1`` equal plateaus from ``start`` to ``end``, evenly spaced values
      ``start + (end - start) · i / num_drops`` for i = min(⌊p · (num_drops + 1)⌋, num_drops): the last plateau,
      ``end``, is reached inside the decay window (4, 3, 2, 1 over four quarters with the defaults);
    - "constant": ``start`` at every step (``end`` and ``total_steps`` unused).

    Exact endpoints: the value at step 0 is ``start``; from step ``decay_fraction · total_steps`` on it is ``end``
    (for "linear" and "cosine" with ``decay_fraction=1`` that is the step after the last one, as in torch's and
    Hugging Face's LR schedules). Monotone in between, decreasing for start > end, increasing for start < end.

    Args:
        start: the weight at step 0, finite and >= 0.
        end: the weight after the decay, finite and >= 0.
        shape: "linear", "cosine", "step" or "constant".
        total_steps: the training length in optimizer steps (>= 1). When set it wins over the ``total_steps``
            given at call time; None (default) takes it from the call (the loop's planned total, via
            :meth:`WeakTeacherKDLoss.set_progress`).
        decay_fraction: in (0, 1], the part of ``total_steps`` over which the weight moves; it stays at ``end``
            after.
        num_drops: "step" only: how many times the weight drops (>= 1).
    """

    start: float = 4.0
    end: float = 1.0
    shape: str = "linear"
    total_steps: int | None = None
    decay_fraction: float = 1.0
    num_drops: int = 3

    def __post_init__(self) -> None:
        # frozen: validated values are stored through object.__setattr__
        object.__setattr__(self, "start", _check_weight("start", self.start))
        object.__setattr__(self, "end", _check_weight("end", self.end))
        functional.check_choice("shape", self.shape, SHAPES)
        object.__setattr__(self, "total_steps", _check_int("total_steps", self.total_steps, low=1, allow_none=True))
        frac = functional.check_real("decay_fraction", self.decay_fraction, low=0.0, high=1.0, low_open=True,
                             high_open=False)  # fmt: skip
        object.__setattr__(self, "decay_fraction", frac)
        object.__setattr__(self, "num_drops", _check_int("num_drops", self.num_drops, low=1))

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        """α_s at optimizer step ``step`` (0-based, >= 0; steps past the decay give ``end``) of a run of
        ``total_steps`` steps (needed unless the schedule has its own ``total_steps`` or is "constant")."""
        step = _check_int("step", step, low=0)
        total_steps = _check_int("total_steps", total_steps, low=1, allow_none=True)
        if self.shape == "constant":
            return self.start
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None:
            raise ValueError(
                f"total_steps is needed for shape={self.shape!r}: give SoftWeightSchedule(total_steps=...) or "
                "pass it at call time (WeakTeacherKDLoss.set_progress(step, total_steps))"
            )
        # the decay's length as an exact fraction (decay_fraction = 0.14 is 7/50, not 0.14000000000000001): its end
        # and the step plateaus' boundaries then fall on the steps they should (0.14 * 100 is 14.000000000000002)
        decay = Fraction(self.decay_fraction).limit_denominator(10**6) * total  # > 0
        # the endpoints are returned as given, not recomputed (end + (start - end) * 1 can round off start)
        if step == 0:
            return self.start
        if step >= decay:
            return self.end
        p = float(step / decay)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * p
        if self.shape == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))
        # "step": (step * levels) / decay is exact (a Fraction), so plateaus switch on time
        levels = self.num_drops + 1
        i = min(math.floor(step * levels / decay), self.num_drops)
        if i == self.num_drops:
            return self.end
        return self.start + (self.end - self.start) * (i / self.num_drops)


def weak_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: functional.TeacherLogits,
    labels: Tensor | None = None,
    *,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    temperature: float = 1.0,
    divergence: str = "kl",
    scale_by_temperature_sq: bool = True,
    ignore_index: int = -100,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    num_items: int | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """The DWT objective ``hard_weight · CE(student, labels) + soft_weight · c · D(teacher_T ‖ student_T)``.

    The weighted sum is the paper's Eq. 3 (with ``divergence="kl"`` and c = 1); c = T² when
    ``scale_by_temperature_sq`` (ours, default, equal to the paper at T = 1). One fused :func:`fastdistill.kd_loss`
    call with ``ce_weight = hard_weight / (hard_weight + soft_weight)``, times ``hard_weight + soft_weight``.

    Args:
        student_logits: [*, V].
        teacher_logits: [*, V], a stacked [K, *, V] tensor or a list of K [*, V] tensors (K > 1: their
            probability mean, kd_loss's default ensemble).
        labels: int64 [*]; needed when ``hard_weight > 0``. Rows labelled ``ignore_index`` carry no loss (neither
            term) and are not counted by the "mean".
        hard_weight: α_h >= 0, the cross-entropy's weight (CE at temperature 1, as in the paper).
        soft_weight: α_s >= 0, the divergence's weight (a float: schedule it with :class:`WeakTeacherKDLoss`).
        temperature: T > 0 of the divergence.
        divergence: any of :func:`fastdistill.kd_loss`'s; "kl" (KL(teacher ‖ student)) is the paper's.
        sample_weight, reduction, num_items, backend: as in :func:`fastdistill.kd_loss`.

    Returns:
        0-dim (or [*] for ``reduction="none"``), float32 (float64 for float64 inputs).
    """
    a_h = _check_weight("hard_weight", hard_weight)
    a_s = _check_weight("soft_weight", soft_weight)
    if a_h > 0 and labels is None:
        raise ValueError("labels are needed when hard_weight > 0 (the cross-entropy term); pass labels or set "
                         "hard_weight=0")  # fmt: skip
    total = _check_weight_sum(a_h, a_s)
    # α_h = α_s = 0: no term is on; still one kd_loss call (its argument checks, a graph to the logits), times 0
    ce_weight = min(1.0, a_h / total) if total > 0 else 0.0
    loss = fastdistill.kd_loss(
        student_logits, teacher_logits, divergence=divergence, temperature=temperature,
        scale_by_temperature_sq=scale_by_temperature_sq, labels=labels, ignore_index=ignore_index,
        ce_weight=ce_weight, sample_weight=sample_weight, reduction=reduction, num_items=num_items, backend=backend,
    )  # fmt: skip
    return loss * total


class WeakTeacherKDLoss(nn.Module):
    """Distillation from a weak teacher as a loss for :class:`~fastdistill.training.DistillationLoop`:
    ``hard_weight · CE(labels) + α_s(step) · c · KL(teacher_T ‖ student_T)`` with a scheduled soft weight.

    The objective is the paper's Eq. 3; the default schedule (4 → 1, linear over the run) follows their
    recommendation, its shape is ours (see docs/lm_methods.md). Before each optimizer step the training loop
    calls :meth:`set_progress` (step, total_steps); :attr:`current_soft_weight` is the weight the next
    :meth:`forward` uses.

    Args:
        hard_weight: α_h >= 0 (the paper: 1).
        soft_weight: a constant α_s >= 0, or a :class:`SoftWeightSchedule` (default: 4 → 1, linear).
        temperature: T > 0 (default 1; the paper's value is not public).
        divergence: "kl" (the paper's) or any of :func:`fastdistill.kd_loss`'s.
        scale_by_temperature_sq: multiply the divergence by T² (ours; the paper's equations have no T², the
            same at T = 1).
        ignore_index: label value of rows without loss (read by the loop too).
        backend: as in :func:`fastdistill.kd_loss`.

    Example::

        loss_fn = WeakTeacherKDLoss(soft_weight=SoftWeightSchedule(4.0, 1.0, shape="cosine"))
        loop = DistillationLoop(big_student, [small_teacher], loss=loss_fn)
    """

    skips_ignored_positions = True  # every term 0 where the label is ignore_index: training.loop moves labels
    # num_items, labels and sample_weight checked as kd_loss checks them: the loop vouches for its own (no syncs)
    values_as_kd_loss = True

    def labels_only_skip(self) -> bool:
        """Whether the labels are read for nothing but which rows to skip (no hard-label term): then
        :class:`~fastdistill.training.DistillationLoop` gives an unlabelled batch its ``attention_mask`` as labels
        that only mask, so that padding carries no loss."""
        return self.hard_weight == 0

    def __init__(
        self,
        *,
        hard_weight: float = 1.0,
        soft_weight: float | SoftWeightSchedule = SoftWeightSchedule(),
        temperature: float = 1.0,
        divergence: str = "kl",
        scale_by_temperature_sq: bool = True,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        functional.check_hyperparameters(
            divergence=divergence, temperature=temperature, ensemble="prob_mean", beta=0.5, skew=0.1,
            ce_weight=0.0, reduction="mean", backend=backend, ignore_index=ignore_index,
            scale_by_temperature_sq=scale_by_temperature_sq,
        )  # fmt: skip
        self.hard_weight = _check_weight("hard_weight", hard_weight)
        if isinstance(soft_weight, SoftWeightSchedule):
            self.soft_weight: float | SoftWeightSchedule = soft_weight
        elif isinstance(soft_weight, numbers.Real) and not isinstance(soft_weight, bool):
            self.soft_weight = _check_weight("soft_weight", soft_weight)
        else:
            raise TypeError(f"soft_weight must be a float or a SoftWeightSchedule, got {type(soft_weight).__name__}")
        # the schedule moves monotonically between start and end: its largest weight is one of them
        largest = (max(soft_weight.start, soft_weight.end) if isinstance(soft_weight, SoftWeightSchedule)
                   else self.soft_weight)  # fmt: skip
        _check_weight_sum(self.hard_weight, largest)
        self.temperature = float(temperature)
        self.divergence = divergence
        self.scale_by_temperature_sq = scale_by_temperature_sq
        self.ignore_index = int(ignore_index)
        self.backend = backend
        # progress as last reported; plain attributes, not state: the loop reports it again before every step,
        # so a resumed run needs nothing from a checkpoint
        self.step = 0
        self.total_steps: int | None = None

    def set_progress(self, step: int, total_steps: int | None = None) -> None:
        """Where training is: ``step`` optimizer steps done (0-based) of ``total_steps`` planned (>= 1, or None
        when unknown: then the schedule needs its own ``total_steps``)."""
        self.step = _check_int("step", step, low=0)
        self.total_steps = _check_int("total_steps", total_steps, low=1, allow_none=True)

    @property
    def current_soft_weight(self) -> float:
        """α_s at the current progress (the weight the next forward uses)."""
        if isinstance(self.soft_weight, SoftWeightSchedule):
            # (a constant one reads no step: compiled, the step would be a constant of the graph)
            if self.soft_weight.shape == "constant":
                return self.soft_weight.start
            return self.soft_weight(self.step, self.total_steps)
        return self.soft_weight

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: functional.TeacherLogits,
        labels: Tensor | None = None,
        *,
        num_items: int | Tensor | None = None,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        """student_logits [*, V]; teacher_logits [*, V], [K, *, V] or K x [*, V]; labels int64 [*] (needed when
        ``hard_weight > 0``). Returns the 0-dim mean over rows not ignored (or ``sum / num_items``).

        Under torch.compile a scheduled weight (any shape but "constant") runs outside the graph (a graph break;
        the fused kernel is the same): traced, the step it is read from is a constant of the graph, and the caller
        would recompile at every step until torch's recompile limit, then fall back to eager for the whole frame.
        A float or "constant" weight is traced."""
        if isinstance(self.soft_weight, SoftWeightSchedule) and self.soft_weight.shape != "constant":
            return self._eager_forward(student_logits, teacher_logits, labels, num_items, sample_weight)
        return self._forward(student_logits, teacher_logits, labels, num_items, sample_weight)

    @torch.compiler.disable
    def _eager_forward(self, *args) -> Tensor:
        return self._forward(*args)

    def _forward(self, student_logits, teacher_logits, labels, num_items, sample_weight) -> Tensor:
        return weak_teacher_kd_loss(
            student_logits, teacher_logits, labels, hard_weight=self.hard_weight,
            soft_weight=self.current_soft_weight, temperature=self.temperature, divergence=self.divergence,
            scale_by_temperature_sq=self.scale_by_temperature_sq, ignore_index=self.ignore_index,
            sample_weight=sample_weight, reduction="mean", num_items=num_items, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"hard_weight={self.hard_weight}, soft_weight={self.soft_weight!r}, temperature={self.temperature}, "
            f"divergence={self.divergence!r}, scale_by_temperature_sq={self.scale_by_temperature_sq}, "
            f"backend={self.backend!r}"
        )
