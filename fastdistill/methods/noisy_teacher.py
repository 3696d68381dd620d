"""Distillation with unlabelled examples under a noisy teacher (issue 7): weighted distillation, SLaM, robust active
distillation.

The setting: a teacher trained on a small labelled set labels a large unlabelled pool, and the student learns from
those labels, but the teacher is often wrong. All three methods rely on one estimate, made on a small labelled
**validation set** that neither model trains on: how often the teacher is right as a function of its confidence.
:class:`TeacherReliability` fits it by isotonic regression (pool-adjacent-violators: monotone, no bins, no
hyper-parameters).

- **Weighted distillation** (Iliopoulos et al., NeurIPS 2022): :func:`distillation_weights` /
  :class:`WeightedKDLoss`, per-example weights passed to :func:`fastdistill.kd_loss` as ``sample_weight``, for hard
  and soft distillation.
- **SLaM, student-label mixing** (Kontonis et al., NeurIPS 2023): :func:`slam_mix` / :func:`slam_loss` /
  :class:`SLaMLoss`, the student's probabilities mixed with the teacher's top-k(x) before the cross-entropy.
- **Robust active distillation** (Baykal et al., ICLR 2023): :func:`robust_sampling_distribution`,
  :class:`RobustActiveSampler`, :func:`active_distillation`: per round, under a query budget, choose pool points to
  ask the teacher about.

The papers, each formula, what is theirs and what is ours (the SLaM operator is the paper's; the weights, the
estimates of α(x) and k(x) and the sampling distribution are ours), and the experiment: ``docs/noisy_teacher.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import fastdistill

from .. import functional
from ..ops import reference

__all__ = [
    "IsotonicCalibrator",
    "RobustActiveSampler",
    "SLaMLoss",
    "TeacherReliability",
    "WeightedKDLoss",
    "active_distillation",
    "distillation_weights",
    "margin",
    "robust_sampling_distribution",
    "slam_loss",
    "slam_mix",
    "systematic_sample",
    "topk_mask",
]

# log-probabilities are floored here before log-sum-exp: finite everywhere, so 0 * log 0 rows never give NaN
_LOG_FLOOR = -100.0
SLAM_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------------
# argument checks (kd_loss's, from fastdistill.functional, where one exists): each names the argument


def _one_teacher(student_logits: Tensor, teacher_logits, who: str) -> Tensor:
    """The one teacher of ``who``, a Tensor shaped like ``student_logits``: ``teacher_logits`` [*, V], [1, *, V] or a
    list of one, checked as :func:`fastdistill.kd_loss` checks its logits (dtype, shape, device)."""
    functional._check_logits("student_logits", student_logits)
    teachers = functional.split_teachers(teacher_logits, student_logits.shape)
    if len(teachers) != 1:
        raise ValueError(f"{who} takes one teacher: teacher_logits [*, V] = {tuple(student_logits.shape)} (or "
                         f"[1, *, V], or a list of one); got K = {len(teachers)} teachers")  # fmt: skip
    functional._check_device("teacher_logits", teachers[0], student_logits.device)
    return teachers[0]


def _kept_confidence(reliability: TeacherReliability, teacher: Tensor, labels: Tensor | None,
                     ignore_index: int) -> Tensor:  # fmt: skip
    """The teacher's confidence [*] from ``teacher`` [*, V], computed once for α, w and k, with the rows whose label
    is ``ignore_index`` (padding: any logits, NaN included, as kd_loss allows) set to 1, so they neither fail the
    calibrators' NaN check nor matter (their loss is skipped). Labels of another shape or dtype are left for the
    loss's own check."""
    conf = reliability._confidence(teacher)
    if not isinstance(labels, Tensor) or labels.shape != conf.shape or labels.is_floating_point():
        return conf
    return conf.masked_fill(labels == ignore_index, 1.0)


def _check_reliability(reliability) -> None:
    if not isinstance(reliability, TeacherReliability):
        raise TypeError(f"reliability must be a TeacherReliability (TeacherReliability.fit on a validation set), got "
                        f"{type(reliability).__name__}")  # fmt: skip


_check_bool = functional.check_bool


def _per_row(name: str, x, rows: torch.Size, device: torch.device, ref: str) -> Tensor | None:
    """A per-row Tensor argument (``alpha``, ``k``): shape [] or [*] = ``rows``, on ``ref``'s device (a 0-dim one may
    be anywhere, as a torch scalar). None when ``x`` is not a Tensor (the caller checks the number)."""
    if not isinstance(x, Tensor):
        return None
    if x.dim() != 0 and x.shape != rows:
        what = "an int" if name == "k" else "a number"
        raise ValueError(f"{name} must be {what} or a Tensor of shape [] or [*] = {tuple(rows)} ({ref} without V), "
                         f"got {tuple(x.shape)}")  # fmt: skip
    if x.dim() != 0:
        functional._check_device(name, x, device, ref=ref)
    return x.to(device)


def _check_alpha(alpha, rows: torch.Size, device: torch.device, dtype: torch.dtype, ref: str) -> Tensor:
    """α(x) in [0, 1]: a real number, or a floating-point Tensor [] or [*] (its values checked unless a caller's
    :func:`fastdistill.functional.values_checked` covers "alpha"); as a ``dtype`` Tensor on ``device``."""
    a = _per_row("alpha", alpha, rows, device, ref)
    if a is None:
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
            raise TypeError(f"alpha must be a number in [0, 1] or a floating-point Tensor [*], got "
                            f"{type(alpha).__name__}")  # fmt: skip
        value = functional.check_real("alpha", alpha, low=0.0, high=1.0, low_open=False, high_open=False)
        return torch.full((), value, dtype=dtype, device=device)  # (torch.tensor(value, device=cuda) syncs)
    if not a.is_floating_point():
        raise TypeError(f"alpha must be a floating-point Tensor (or a number in [0, 1]), got {a.dtype}")
    a = a.to(dtype)
    # a device sync on CUDA, skipped where the caller vouches for alpha (SLaMLoss: calibrated, in [0, 1])
    functional._check_values("alpha", a, "in [0, 1] (and not NaN)", ~((a >= 0) & (a <= 1)))
    return a


# ---------------------------------------------------------------------------------------------------------------
# calibration: P(teacher correct | a score), fitted on the validation set


class IsotonicCalibrator:
    """Non-decreasing step function of a score fitted by pool-adjacent-violators (least squares, isotonic).

    ``fit(score [N], target [N])`` with targets in [0, 1] (here: 1 if the teacher is right); ``calibrator(score)``
    returns the fitted value of the block whose score range contains the query, the lower block between two blocks,
    the first (last) block's value below (above) the fitted range. No hyper-parameters.
    """

    def __init__(self) -> None:
        self.lo: Tensor | None = None  # [B] smallest score of each block
        self.value: Tensor | None = None  # [B] fitted value of each block, non-decreasing
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # (lo, value) copied to a query's device, once

    def fit(self, score: Tensor, target: Tensor) -> IsotonicCalibrator:
        for name, x in (("score", score), ("target", target)):
            if not isinstance(x, Tensor) or x.is_complex():
                got = x.dtype if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(f"{name} must be a real Tensor [N], got {got}")
        score = score.detach().double().flatten()
        target = target.detach().double().flatten()
        if score.numel() == 0 or score.shape != target.shape:
            raise ValueError(f"score and target must be non-empty and of the same length, got {score.numel()} and "
                             f"{target.numel()} values")  # fmt: skip
        functional._check_values("score", score, "a number in every entry, not NaN", torch.isnan(score))
        functional._check_values("target", target, "in [0, 1] (a probability: 1 where the teacher is right), not NaN",
                                 ~((target >= 0) & (target <= 1)))  # fmt: skip
        # equal scores form one starting block (ties get one value); blocks as [lo, sum, count]
        uniq, inv = torch.unique(score, sorted=True, return_inverse=True)
        sums = torch.zeros_like(uniq).index_add_(0, inv, target)
        counts = torch.zeros_like(uniq).index_add_(0, inv, torch.ones_like(target))
        blocks: list[list[float]] = []
        for lo, sm, ct in zip(uniq.tolist(), sums.tolist(), counts.tolist()):
            blocks.append([lo, sm, ct])
            # pool while the previous block's mean exceeds the last one's (pool-adjacent-violators)
            while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
                last = blocks.pop()
                blocks[-1][1] += last[1]
                blocks[-1][2] += last[2]
        self.lo = torch.tensor([b[0] for b in blocks], dtype=torch.float64)
        self.value = torch.tensor([b[1] / b[2] for b in blocks], dtype=torch.float64)
        self._on = {}
        return self

    def __call__(self, score: Tensor) -> Tensor:
        """[*] scores -> [*] fitted values (float32)."""
        if self.lo is None or self.value is None:
            raise RuntimeError("fit the calibrator first")
        if score.device not in self._on:  # [B]: a few numbers, copied to the query's device once
            self._on[score.device] = (self.lo.to(score.device), self.value.to(score.device))
        lo, value = self._on[score.device]
        # a NaN score would sort past the last block and get the highest value: the most trusted teacher
        functional._check_values("score", score, "a number in every entry, not NaN", torch.isnan(score))
        idx = torch.searchsorted(lo, score.detach().double().contiguous(), right=True) - 1
        return value[idx.clamp(0, len(value) - 1)].float()


def _confidence(teacher_logits: Tensor) -> Tensor:
    # the teacher's top-1 probability; [*, V] -> [*]
    functional._check_logits("teacher_logits", teacher_logits)
    return torch.softmax(teacher_logits.detach().float(), dim=-1).amax(-1)


class TeacherReliability:
    """How often the teacher is right, as a function of its confidence (top-1 probability), fitted on a labelled
    validation set: for k = 1..max_k an :class:`IsotonicCalibrator` of 1[label in the teacher's top k] against the
    teacher's confidence (consecutive k with the same targets share one object). ``accuracy`` is the top-1 curve
    (α(x) of SLaM, the weights of weighted distillation)."""

    def __init__(self, calibrators: list[IsotonicCalibrator], num_classes: int | None = None) -> None:
        if not (isinstance(calibrators, Sequence) and calibrators
                and all(isinstance(c, IsotonicCalibrator) for c in calibrators)):  # fmt: skip
            raise TypeError("calibrators must be a non-empty list of IsotonicCalibrator (index k - 1: top-k)")
        if num_classes is not None:
            num_classes = functional._check_int64("num_classes", num_classes)
            if num_classes < len(calibrators):
                raise ValueError(f"num_classes must be >= the number of top-k curves ({len(calibrators)}), "
                                 f"got {num_classes}")  # fmt: skip
        self.calibrators = list(calibrators)  # index k - 1
        # V of the teacher it was fitted on (None: not known): a confidence over another vocabulary is another
        # scale (1/V at chance), so the curves do not apply to it
        self.num_classes = num_classes
        self._tables: dict = {}  # per device (_table)

    def __setstate__(self, state: dict) -> None:
        # a pickle made before the tables existed, or with tables of the per-k layout (rebuilt by _table)
        self.__dict__.update(state)
        if not isinstance(self.__dict__.get("_tables"), dict):
            self._tables = {}

    @classmethod
    def fit(cls, teacher_logits: Tensor, labels: Tensor, max_k: int | None = None) -> TeacherReliability:
        """``teacher_logits`` [N, V] and true ``labels`` [N] of the validation set."""
        functional._check_logits("teacher_logits", teacher_logits)
        v = teacher_logits.shape[-1]
        if labels is None:
            raise TypeError("labels must be an int64 Tensor (the validation set's true classes), got NoneType")
        flat, _, _ = functional.row_arguments(
            teacher_logits, labels=labels, ignore_index=-100, check_label_range=False, label_use="",
            sample_weight=None, reduction="none", num_items=None, acc=torch.float32, name="teacher_logits",
        )  # fmt: skip
        functional._check_values("labels", flat, f"in [0, {v}) (the true class of each validation row; no row is "
                                 "skipped here)", (flat < 0) | (flat >= v))  # fmt: skip
        if max_k is not None:
            max_k = functional._check_int64("max_k", max_k)
            if max_k < 1:
                raise ValueError(f"max_k must be >= 1 (or None: V), got {max_k}")
        max_k = v if max_k is None else min(max_k, v)
        conf = _confidence(teacher_logits)
        # the label's place in the teacher's order (0 = top-1), ties broken by index as topk_mask breaks them: in
        # bfloat16 logits many classes tie, and "strictly greater" alone put the label first among them
        at_label = teacher_logits.gather(-1, labels[..., None])
        before = torch.arange(v, device=teacher_logits.device) < labels[..., None]
        rank_of_label = ((teacher_logits > at_label) | ((teacher_logits == at_label) & before)).sum(-1)
        # curve k's targets are 1[rank < k]: they change from curve k - 1 only where some row's label has rank k - 1,
        # so consecutive curves with the same targets share one fitted calibrator (at most N + 1 fits, not V: an LM
        # vocabulary of 128k took minutes of pool-adjacent-violators in Python)
        changes = torch.zeros(max_k, dtype=torch.bool)
        changes[rank_of_label[rank_of_label < max_k].cpu()] = True
        curves: list[IsotonicCalibrator] = []
        for k in range(1, max_k + 1):
            if k == 1 or changes[k - 1]:
                fitted = IsotonicCalibrator().fit(conf, (rank_of_label < k).double())
            curves.append(fitted)
        return cls(curves, v)

    def _confidence(self, teacher_logits: Tensor) -> Tensor:
        v = getattr(self, "num_classes", None)  # (pickles made before it was stored: unknown)
        if v is not None and teacher_logits.dim() > 0 and teacher_logits.shape[-1] != v:
            raise ValueError(f"teacher_logits must be [*, V] with V = {v} (the classes the curves were fitted on), "
                             f"got {tuple(teacher_logits.shape)}")  # fmt: skip
        return _confidence(teacher_logits)

    @property
    def max_k(self) -> int:
        return len(self.calibrators)

    def accuracy(self, teacher_logits: Tensor) -> Tensor:
        """[*, V] -> [*]: the estimated top-1 accuracy of the teacher at its confidence on each row."""
        return self.calibrators[0](self._confidence(teacher_logits))

    def topk_accuracy(self, teacher_logits: Tensor, k: int) -> Tensor:
        """[*, V] -> [*]: the estimated probability that the true label is among the teacher's top ``k``."""
        k = functional._check_int64("k", k)
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must be in [1, max_k] = [1, {self.max_k}] (the fitted top-k curves), got {k}")
        return self.calibrators[k - 1](self._confidence(teacher_logits))

    def smallest_k(self, teacher_logits: Tensor, target: float = 0.9) -> Tensor:
        """[*, V] -> int64 [*]: per row, the smallest k whose estimated top-k accuracy at the row's confidence is
        at least ``target`` (``max_k`` if none is). SLaM's k(x); the threshold 0.9 is our choice."""
        return self._smallest_k_at(self._confidence(teacher_logits), target)

    def _smallest_k_at(self, conf: Tensor, target: float) -> Tensor:
        """:meth:`smallest_k` of the teacher's confidences ``conf`` [*]."""
        functional.check_real("target", target, low=0.0, high=1.0, low_open=False, high_open=False)
        first_k, lo, value, last = self._table(conf.device)
        score = conf.detach().double().reshape(1, -1)
        k = torch.full(score.shape[1:], self.max_k, dtype=torch.long, device=conf.device)
        # all curves at once, a chunk of them per pass (max_k is V by default: one pass per k was ~6 launches per
        # class, ~1 s per step at V = 32k on a GPU); a chunk's [C, rows] lookups stay within ~4M entries
        runs = lo.shape[0]
        chunk = max(1, 2**22 // max(1, score.shape[1]))
        for start in range(0, runs, chunk):
            rows = slice(start, start + chunk)
            n = lo[rows].shape[0]
            # each curve's block (as IsotonicCalibrator.__call__: right=True, minus 1, clamped to its own blocks)
            idx = torch.searchsorted(lo[rows], score.expand(n, -1).contiguous(), right=True) - 1
            idx = torch.minimum(idx.clamp_min(0), last[rows, None])
            ok = value[rows].gather(1, idx).float() >= target  # [C, rows]
            first = torch.where(ok.any(0), first_k[rows][ok.int().argmax(0)], self.max_k)  # argmax: the first True
            k = torch.minimum(k, first)
        return k.reshape(conf.shape)

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The distinct curves as padded tables on ``device``, one row per run of consecutive k sharing a calibrator
        (``fit`` shares one where the targets do not change): the run's first k [R], block starts [R, B] (+inf past a
        curve's blocks), values [R, B] and each curve's last block index [R]; built once per device (again if a
        curve is refit)."""
        fitted = [c.lo for c in self.calibrators]
        if any(lo is None for lo in fitted):
            raise RuntimeError("fit the calibrators first")
        # (not self.__dict__.setdefault: torch 2.11's Dynamo cannot trace it, and the method losses compile)
        tables = self._tables
        cached = tables.get(device)
        if (cached is None or len(cached) != 5  # (a pickle's table of the per-k layout: rebuilt)
                or len(cached[0]) != len(fitted) or any(a is not b for a, b in zip(cached[0], fitted))):  # fmt: skip
            starts = [i for i, c in enumerate(self.calibrators) if i == 0 or c is not self.calibrators[i - 1]]
            curves = [self.calibrators[i] for i in starts]
            width = max(len(c.lo) for c in curves)
            lo = torch.full((len(curves), width), torch.inf, dtype=torch.float64)
            value = torch.zeros((len(curves), width), dtype=torch.float64)
            for i, c in enumerate(curves):
                lo[i, : len(c.lo)], value[i, : len(c.value)] = c.lo, c.value
            last = torch.tensor([len(c.lo) - 1 for c in curves])
            first_k = torch.tensor(starts) + 1
            cached = tables[device] = (fitted, first_k.to(device), lo.to(device), value.to(device), last.to(device))
        return cached[1:]


# ---------------------------------------------------------------------------------------------------------------
# 1. weighted distillation


def distillation_weights(reliability: TeacherReliability, teacher_logits: Tensor) -> Tensor:
    """Per-example weights for the student's loss on teacher-labelled rows: [*, V] -> [*] in [0, 1].

    w(x) = the teacher's accuracy at its confidence on x, estimated on the validation set (isotonic). Rows on
    which the teacher is usually wrong count little, rows it is sure of count fully; no hyper-parameter.

    What is inferred: Iliopoulos et al. describe a hyper-parameter-free "debiasing" reweighting fitted on a
    validation set, for hard and soft distillation; we did not have their exact weight formula. Estimated
    accuracy is the weight the issue specifies and the natural reading: it is the probability that the teacher's
    label is the true one, i.e. the expected share of the row's loss that pushes towards the truth.
    """
    return reliability.accuracy(teacher_logits)


class WeightedKDLoss(nn.Module):
    """Weighted distillation as a loss for :class:`~fastdistill.training.DistillationLoop`:
    ``loss(student [B, V], teacher [B, V] (or [1, B, V] / a list of one), labels=None)``.

    The weights come from the teacher's logits on the batch (:func:`distillation_weights`) and go to
    :func:`fastdistill.kd_loss` as ``sample_weight`` (times any ``sample_weight`` the batch carries).
    ``hard=True``: cross-entropy on the teacher's label (``ce_weight=1``); else soft KD at ``temperature``.
    ``labels`` (the batch's, where it has them) are not learnt from: rows whose label is ``ignore_index`` (padding)
    are skipped, and ``reduction="mean"`` divides by the rows not ignored (rows of weight 0 count), or by
    ``num_items`` (the loop's count over a step's micro-batches), as :func:`fastdistill.kd_loss` does.
    """

    skips_ignored_positions = True  # every term 0 where the label is ignore_index: training.loop moves labels
    # num_items, labels and sample_weight checked as kd_loss checks them: the loop vouches for its own (no syncs)
    values_as_kd_loss = True

    def labels_only_skip(self) -> bool:
        """Whether the labels are read for nothing but which rows to skip (no hard-label term): then
        :class:`~fastdistill.training.DistillationLoop` gives an unlabelled batch its ``attention_mask`` as labels
        that only mask, so that padding carries no loss."""
        return True  # the batch's labels are never learnt from

    def __init__(self, reliability: TeacherReliability, *, hard: bool = False, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        _check_reliability(reliability)
        _check_bool("hard", hard)
        functional.check_hyperparameters(
            divergence="kl", temperature=temperature, ensemble="prob_mean", beta=0.5, skew=0.1, ce_weight=0.0,
            reduction=reduction, backend="auto", ignore_index=ignore_index, scale_by_temperature_sq=True,
        )  # fmt: skip
        self.reliability, self.hard, self.temperature = reliability, hard, temperature
        self.ignore_index, self.reduction = ignore_index, reduction

    def extra_repr(self) -> str:
        return (f"max_k={self.reliability.max_k}, hard={self.hard}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")  # fmt: skip

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor], labels: Tensor | None = None,
                *, num_items: int | Tensor | None = None, sample_weight: Tensor | None = None) -> Tensor:  # fmt: skip
        """student_logits [*, V]; teacher_logits [*, V] (or [1, *, V] / a list of one); labels int64 [*] or None."""
        t = _one_teacher(student_logits, teacher_logits, "WeightedKDLoss")
        # the caller's labels and sample_weight, checked before they are combined with the weights (errors then name
        # what the caller passed, never the combined weight)
        functional.row_arguments(
            student_logits, labels=labels, ignore_index=self.ignore_index, check_label_range=False, label_use="",
            sample_weight=sample_weight, reduction=self.reduction, num_items=num_items,
            acc=reference.compute_dtype(student_logits, t),
        )  # fmt: skip
        w = self.reliability.calibrators[0](_kept_confidence(self.reliability, t, labels, self.ignore_index))
        if sample_weight is not None:
            w = w * sample_weight
        kw = dict(sample_weight=w, ignore_index=self.ignore_index, reduction=self.reduction, num_items=num_items)
        # w is a calibrated accuracy in [0, 1] times a sample_weight checked above: finite and >= 0
        # (the hard labels below are the teacher's argmax or ignore_index: in range)
        with functional.values_checked("sample_weight", "num_items", *(("labels",) if self.hard else ())):
            if self.hard:
                hard = t.argmax(-1)
                if labels is not None:  # the teacher's label, except on the rows the batch marks as ignored
                    hard = torch.where(labels == self.ignore_index, labels, hard)
                return fastdistill.kd_loss(student_logits, t, hard, ce_weight=1.0, **kw)
            return fastdistill.kd_loss(student_logits, t, labels, temperature=self.temperature, **kw)


# ---------------------------------------------------------------------------------------------------------------
# 2. SLaM


def topk_mask(teacher_logits: Tensor, k: Tensor | int) -> Tensor:
    """top(y_teacher(x); k(x)): bool [*, V], True on each row's ``k`` highest teacher classes (``k`` int or [*])."""
    functional._check_logits("teacher_logits", teacher_logits)
    v, rows = teacher_logits.shape[-1], teacher_logits.shape[:-1]
    kt = _per_row("k", k, rows, teacher_logits.device, "teacher_logits")
    if kt is None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an int or an integer Tensor [*] (the number of top classes), got "
                            f"{type(k).__name__}")  # fmt: skip
        if not 1 <= k <= v:
            raise ValueError(f"k must be in [1, {v}] (V = {v} classes), got {k}")
        kt = torch.full((), int(k), device=teacher_logits.device)
    else:
        if kt.is_floating_point() or kt.is_complex() or kt.dtype == torch.bool:
            raise TypeError(f"k must be an int or an integer Tensor [*] (the number of top classes), got {kt.dtype}")
        functional._check_values("k", kt, f"in [1, {v}] (V = {v} classes) on every row", (kt < 1) | (kt > v))
    kt = kt.expand(rows)
    rank = torch.argsort(torch.argsort(teacher_logits, dim=-1, descending=True, stable=True), dim=-1, stable=True)
    return rank < kt[..., None]


def slam_mix(student_probs: Tensor, alpha: Tensor | float, mask: Tensor, *, normalize: bool = False) -> Tensor:
    """The SLaM mixing operator in probability space (the papers' formula; for reading and tests).

    mix(f) = α·f + (1 − α)·(1 − f) ⊙ top / c, with c = 1 (unnormalised, as in the authors' experiments) or
    c = max(k − 1, 1) (``normalize=True``), k = the number of True entries of the row's mask.

    Args:
        student_probs: f, [*, V] probabilities.
        alpha: α(x), [*] (or a float) in [0, 1].
        mask: top(y_teacher(x); k(x)), bool [*, V] (:func:`topk_mask`).
    Returns:
        [*, V].
    """
    functional._check_logits("student_probs", student_probs)
    rows = student_probs.shape[:-1]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool Tensor [*, V] (topk_mask), got {got}")
    if mask.shape != student_probs.shape:
        raise ValueError(f"mask must have shape {tuple(student_probs.shape)} like student_probs, got "
                         f"{tuple(mask.shape)}")  # fmt: skip
    functional._check_device("mask", mask, student_probs.device, ref="student_probs")
    _check_bool("normalize", normalize)
    alpha = _check_alpha(alpha, rows, student_probs.device, student_probs.dtype, "student_probs")
    alpha = alpha.expand(rows)[..., None]
    second = (1 - student_probs) * mask.to(student_probs.dtype)
    if normalize:
        second = second / (mask.sum(-1, keepdim=True) - 1).clamp_min(1).to(student_probs.dtype)
    return alpha * student_probs + (1 - alpha) * second


def slam_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: Tensor | float,
    k: Tensor | int,
    *,
    normalize: bool = False,
    sample_weight: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | Tensor | None = None,
) -> Tensor:
    """SLaM: cross-entropy of the teacher's soft label against mix(student's probabilities), in log space.

    loss(x) = −Σ_v p_teacher(v|x) · log mix(f(x))_v with mix as in :func:`slam_mix`, computed as
    log mix_v = logaddexp(log α + log f_v, log(1 − α) + log(1 − f_v) + log top_v − log c), with log f from
    ``log_softmax`` (never floored: the loss grows and keeps its gradient however unlikely a class becomes) and
    log(1 − f) = log(−expm1(log f)). The terms that vanish by construction (log α at α = 0, log(1 − α) at α = 1,
    log(1 − f) at f = 1) are floored at −100 so that such rows stay finite and their gradients are 0, never NaN;
    classes outside the top k have no second term at all.

    Args:
        student_logits: [N, V] (or [*, V]).
        teacher_logits: [*, V]; its softmax (T = 1) is the soft label, its top ``k`` the mixing mask. Constant.
        alpha: [*] α(x) in [0, 1] (or a float); k: int or int64 [*] in [1, V].
        sample_weight: optional [*] non-negative weights.
        labels: optional int64 [*]: not learnt from; rows whose label is ``ignore_index`` (padding) are skipped:
            they (and rows of weight 0) give 0 and a zero gradient whatever their logits hold, NaN included.
        reduction: "mean" (over the rows not ignored, weight-0 rows included, or ``num_items``), "sum" or "none"
            ([*]).
        num_items: the "mean" denominator instead of the count of rows not ignored (as in
            :func:`fastdistill.kd_loss`: a training loop's count over a step's micro-batches).
    Returns:
        float32 (float64 for float64 logits), 0-dim or [*].
    """
    # kd_loss's checks (fastdistill.functional), in its words: the reduction, ignore_index, the logits' dtypes and
    # shapes (one teacher, shaped like the student), devices, labels / sample_weight / num_items
    functional.check_choice("reduction", reduction, SLAM_REDUCTIONS)
    functional._check_int64("ignore_index", ignore_index)
    teacher_logits = _one_teacher(student_logits, teacher_logits, "slam_loss")
    _check_bool("normalize", normalize)
    acc = reference.compute_dtype(student_logits, teacher_logits)
    rows, device = student_logits.shape[:-1], student_logits.device
    # (sample_weight's values: finite and >= 0, as kd_loss's check; a negative weight would select a neutralised row)
    _, _, denominator = functional.row_arguments(
        student_logits, labels=labels, ignore_index=ignore_index, check_label_range=False, label_use="",
        sample_weight=sample_weight, reduction=reduction, num_items=num_items, acc=acc,
    )  # fmt: skip
    alpha = _check_alpha(alpha, rows, device, acc, "student_logits")
    kept = None if labels is None else labels != ignore_index
    live = kept
    if sample_weight is not None:
        live = sample_weight > 0 if live is None else live & (sample_weight > 0)
    if live is not None:  # skipped rows give exactly 0 and a zero gradient whatever their logits (NaN padding
        # included): neutralised before the math, as kd_loss does, so nothing in them reaches the gradient via 0 * NaN
        student_logits = torch.where(live[..., None], student_logits, 0.0)
        teacher_logits = torch.where(live[..., None], teacher_logits, 0.0)
    t = teacher_logits.detach().to(acc)
    p_t = torch.softmax(t, dim=-1)
    # classes the teacher gives no mass (-inf logits: a masked or padded vocabulary) carry no term: a finite stand-in
    # there, so that 0 * log mix is 0 where the student is -inf too, never 0 * -inf = NaN (nor a NaN gradient)
    log_f = torch.where(p_t > 0, torch.log_softmax(student_logits.to(acc), dim=-1), 0.0)
    mask = topk_mask(t, k)
    alpha = alpha.expand(log_f.shape[:-1])[..., None]
    # (floors as Python numbers: a tensor made on the GPU per call is a blocking host-to-device copy)
    log_a, log_1ma = torch.log(alpha).clamp_min(_LOG_FLOOR), torch.log1p(-alpha).clamp_min(_LOG_FLOOR)
    # log(1 - f): -expm1(log f) is exact near f = 1; clamp the argument so f = 1 gives the floor, not log 0
    log_1mf = torch.log((-torch.expm1(log_f)).clamp_min(torch.finfo(acc).tiny)).clamp_min(_LOG_FLOOR)
    second = log_1ma + log_1mf
    if normalize:
        c = (mask.sum(-1, keepdim=True) - 1).clamp_min(1).to(acc)
        second = second - torch.log(c)
    # outside the top k the mix is α f alone: logaddexp(x, -inf) = x, its gradient 1 and 0 (the first term is finite)
    log_mix = torch.logaddexp(log_a + log_f, torch.where(mask, second, -torch.inf))
    per_row = -(p_t * log_mix).sum(-1)
    if sample_weight is not None:
        per_row = per_row * sample_weight.to(per_row.dtype)
    if kept is not None:
        per_row = torch.where(kept, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    # kd_loss's "mean" denominator (row_arguments): num_items, else the rows not ignored (N without labels); 0 -> 1
    return total / denominator


class SLaMLoss(nn.Module):
    """SLaM as a loss for :class:`~fastdistill.training.DistillationLoop`: α(x) and k(x) come from the teacher's
    logits on the batch through a fitted :class:`TeacherReliability` (α = estimated top-1 accuracy at the teacher's
    confidence; k = the smallest k with estimated top-k accuracy ≥ ``topk_target``). ``labels``, ``ignore_index``,
    ``num_items`` and the reduction as in :func:`slam_loss` (the batch's labels only mark rows to skip)."""

    skips_ignored_positions = True  # every term 0 where the label is ignore_index: training.loop moves labels
    # num_items, labels and sample_weight checked as kd_loss checks them: the loop vouches for its own (no syncs)
    values_as_kd_loss = True

    def labels_only_skip(self) -> bool:
        """Whether the labels are read for nothing but which rows to skip (no hard-label term): then
        :class:`~fastdistill.training.DistillationLoop` gives an unlabelled batch its ``attention_mask`` as labels
        that only mask, so that padding carries no loss."""
        return True  # the batch's labels are never learnt from

    def __init__(self, reliability: TeacherReliability, *, normalize: bool = False, topk_target: float = 0.9,
                 ignore_index: int = -100, reduction: str = "mean") -> None:  # fmt: skip
        super().__init__()
        _check_reliability(reliability)
        _check_bool("normalize", normalize)
        topk_target = functional.check_real("topk_target", topk_target, low=0.0, high=1.0, low_open=False,
                                            high_open=False)  # fmt: skip
        functional._check_int64("ignore_index", ignore_index)
        functional.check_choice("reduction", reduction, SLAM_REDUCTIONS)
        self.reliability, self.normalize, self.topk_target = reliability, normalize, topk_target
        self.ignore_index, self.reduction = ignore_index, reduction

    def extra_repr(self) -> str:
        return (f"max_k={self.reliability.max_k}, normalize={self.normalize}, topk_target={self.topk_target}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")  # fmt: skip

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor], labels: Tensor | None = None,
                *, num_items: int | Tensor | None = None, sample_weight: Tensor | None = None) -> Tensor:  # fmt: skip
        """student_logits [*, V]; teacher_logits [*, V] (or [1, *, V] / a list of one); labels int64 [*] or None."""
        t = _one_teacher(student_logits, teacher_logits, "SLaMLoss")
        conf = _kept_confidence(self.reliability, t, labels, self.ignore_index)  # one softmax for α and k
        alpha = self.reliability.calibrators[0](conf)  # (accuracy) isotonic fit of 0/1 targets: in [0, 1]
        k = self.reliability._smallest_k_at(conf, self.topk_target)
        # k: in [1, max_k], within this teacher's V when the curves were fitted on at most as many classes
        vouched = ("alpha", "k") if self.reliability.max_k <= t.shape[-1] else ("alpha",)
        with fastdistill.functional.values_checked(*vouched):
            return slam_loss(student_logits, t, alpha, k, normalize=self.normalize, sample_weight=sample_weight,
                             labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
                             num_items=num_items)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 3. robust active distillation


def margin(logits: Tensor) -> Tensor:
    """[*, V] -> [*]: top-1 minus top-2 probability (small = uncertain)."""
    top2 = torch.softmax(logits.detach().float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def robust_sampling_distribution(gains: Tensor, budget: int) -> Tensor:
    """Inclusion probabilities p [N] with Σ p = ``budget``, 0 ≤ p ≤ 1, p_i = min(1, λ·g_i) for the λ that meets the
    budget (capped proportional: "water-filling" from the top). Parameter-free given the budget.

    Points with zero gain are never drawn (unless fewer than ``budget`` points have positive gain: then every point
    with positive gain gets p = 1 and the remainder is spread uniformly over the rest).

    What is inferred: Baykal et al. derive their distribution from a game between the learner (informativeness)
    and an adversary (which points the teacher mislabels); we did not have their closed form. This distribution
    has the two properties the abstract asks for: it is parameter-free, and it randomises instead of taking the
    top-``budget`` gains greedily, so no single score error (a point the teacher gets wrong) is picked for certain.
    """
    if not isinstance(gains, Tensor) or gains.is_complex() or gains.dtype == torch.bool:
        got = gains.dtype if isinstance(gains, Tensor) else type(gains).__name__
        raise TypeError(f"gains must be a real Tensor [N] (one gain per pool point), got {got}")
    if gains.dim() != 1:
        raise ValueError(f"gains must have shape [N] (one gain per pool point), got {tuple(gains.shape)}")
    budget = functional._check_int64("budget", budget)
    g = gains.detach().double().flatten()
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gains must be finite (a NaN gain comes from a student with non-finite logits)")
    g = g.clamp_min(0)
    n = g.numel()
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, {n}], got {budget}")
    p = torch.zeros(n, dtype=torch.float64)
    pos = g > 0
    if budget == 0:
        return p.float()
    if int(pos.sum()) <= budget:
        p[pos] = 1.0
        rest = budget - int(pos.sum())
        if rest:
            p[~pos] = rest / int((~pos).sum())
        return p.float()
    # capped proportional: the largest gains saturate at 1 one at a time until λ·g ≤ 1 for the rest
    order = torch.argsort(g, descending=True)
    gs = g[order]
    # the sums of gs[i:], each its own sum (a running sum less the capped gains cancels: 1e20 - 1e20 leaves
    # nothing of the small gains behind it)
    tails = gs.flip(0).cumsum(0).flip(0).tolist()
    capped = 0
    while True:
        lam = (budget - capped) / tails[capped]
        if lam * gs[capped] <= 1 + 1e-12:
            break
        capped += 1
    out = torch.minimum(lam * gs, torch.ones_like(gs))
    out[:capped] = 1.0
    p[order] = out
    return p.float()


def systematic_sample(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw exactly round(Σ p) distinct indices with inclusion probability p_i each (systematic sampling on a
    random permutation: one uniform offset u, index i taken when an integer lies in its cumulative interval).
    p [N] in [0, 1] -> int64 [round(Σ p)]."""
    n = p.numel()
    perm = torch.randperm(n, generator=generator)
    cum = torch.cumsum(p.double()[perm], 0)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    hits = torch.floor(cum - u + 1) - torch.floor(torch.cat([cum.new_zeros(1), cum[:-1]]) - u + 1)
    return perm[hits > 0.5].sort().values


class RobustActiveSampler:
    """Chooses which pool points to query the teacher on, per round.

    gain(x) = (1 − margin_student(x)) · P̂(teacher right | margin_student(x)): informative points (small student
    margin) count, discounted by the risk that the teacher mislabels them. The risk is estimated on the labelled
    validation set each round (isotonic in the current student's margin; the teacher's answers on the validation
    set are fixed, queried once), so it needs no teacher query on the pool. Then
    p = :func:`robust_sampling_distribution` (gains, budget) and :func:`systematic_sample` draws the points. The
    gain's form is ours (see :func:`robust_sampling_distribution`); the trade-off it encodes is the paper's.
    """

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def gains(self, student_pool_logits: Tensor, student_val_logits: Tensor, teacher_val_correct: Tensor) -> Tensor:
        """[N_pool, V], [N_val, V], [N_val] (1 where the teacher's label is right) -> [N_pool] gains."""
        risk = IsotonicCalibrator().fit(margin(student_val_logits), teacher_val_correct.double())
        m = margin(student_pool_logits)
        return (1 - m) * risk(m)

    def select(self, student_pool_logits: Tensor, student_val_logits: Tensor, teacher_val_correct: Tensor,
               budget: int) -> Tensor:  # fmt: skip
        """Indices (int64 [budget]) into the pool to query."""
        g = self.gains(student_pool_logits, student_val_logits, teacher_val_correct)
        return systematic_sample(robust_sampling_distribution(g, budget), self.generator)


def active_distillation(
    student: nn.Module,
    pool_x: Tensor,
    query_teacher: Callable[[Tensor], Tensor],
    train: Callable[[nn.Module, Tensor, Tensor], None],
    *,
    budgets: Sequence[int],
    select: Callable[[nn.Module, Tensor, int], Tensor],
    on_round: Callable[[int, nn.Module, Tensor], None] | None = None,
) -> Tensor:
    """Rounds of score pool → sample → query teacher → train.

    Args:
        student: trained in place (warm-started from whatever it is).
        pool_x: [N, ...] the unlabelled pool.
        query_teacher: x [n, ...] -> teacher logits [n, V] (the expensive call, made once per queried point).
        train: (student, x [m, ...], teacher logits [m, V]) -> None, on everything queried so far.
        budgets: the number of new queries per round.
        select: (student, candidates x [n, ...], budget) -> indices into the candidates (e.g. a
            :class:`RobustActiveSampler`, or uniform at random).
        on_round: optional callback (round, student, queried indices so far).
    Returns:
        int64 [Σ budgets] the queried pool indices, in query order.
    """
    queried = torch.zeros(len(pool_x), dtype=torch.bool)
    order: list[Tensor] = []
    logits: list[Tensor] = []
    for r, b in enumerate(budgets):
        cand = (~queried).nonzero().squeeze(1)
        pick = cand[select(student, pool_x[cand], b)]
        queried[pick] = True
        order.append(pick)
        with torch.no_grad():
            logits.append(query_teacher(pool_x[pick]))
        idx = torch.cat(order)
        train(student, pool_x[idx], torch.cat(logits))
        if on_round is not None:
            on_round(r, student, idx)
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
