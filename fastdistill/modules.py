"""``nn.Module`` wrappers of :mod:`fastdistill.functional`: hyper-parameters in ``__init__``, tensors in ``forward``."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import functional
from .ops import reference
from .ops.dispatch import BACKENDS_NAMES


def _setting_repr(value) -> str:
    """A setting as ``extra_repr`` shows it: a tensor by shape and dtype (its values could be many, on a device
    (a sync to read) or on the meta device (none to read)), anything else as ``repr``."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
    return repr(value)


class _KDSettings(nn.Module):
    """:func:`fastdistill.kd_loss`'s hyper-parameters as attributes: checked at construction, read at every call
    (a value changed afterwards is used, and checked, by the next call); a tensor ``teacher_weights`` is a buffer,
    so it moves with ``.to(device)``, not in the state dict (a setting, like the others)."""

    def __init__(self, *, divergence: str, temperature: float, scale_by_temperature_sq: bool, ensemble: str,
                 teacher_weights: Tensor | Sequence[float] | None, beta: float, skew: float, ignore_index: int,
                 ce_weight: float, reduction: str, backend: str) -> None:  # fmt: skip
        super().__init__()
        functional.check_hyperparameters(
            divergence=divergence, temperature=temperature, ensemble=ensemble, beta=beta, skew=skew,
            ce_weight=ce_weight, reduction=reduction, backend=backend, ignore_index=ignore_index,
            scale_by_temperature_sq=scale_by_temperature_sq,
        )  # fmt: skip
        functional.check_teacher_weights(teacher_weights)
        self.divergence = divergence
        self.temperature = temperature
        self.scale_by_temperature_sq = scale_by_temperature_sq
        self.ensemble = ensemble
        if isinstance(teacher_weights, Tensor):
            self.register_buffer("teacher_weights", teacher_weights, persistent=False)
        else:
            self.teacher_weights = teacher_weights
        self.beta = beta
        self.skew = skew
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.reduction = reduction
        self.backend = backend

    def _apply(self, fn, recurse=True):
        # loss_fn.half() / .to(torch.bfloat16) (or a parent module's) moves the weights but keeps their dtype:
        # weights rounded to 8 bits would skew the ensemble, and the kernels accumulate in float32 anyway
        weights = self._buffers.get("teacher_weights")
        out = super()._apply(fn, recurse)
        moved = self._buffers.get("teacher_weights")
        if weights is not None and moved is not None and moved.dtype != weights.dtype:
            self._buffers["teacher_weights"] = weights.to(moved.device)
        return out

    def kd_settings(self, teacher_weights: Tensor | Sequence[float] | None = None) -> dict[str, Any]:
        """The keywords of :func:`fastdistill.kd_loss` this module holds (``teacher_weights`` given here, a call's
        own, replaces the module's)."""
        return dict(
            divergence=self.divergence, temperature=self.temperature,
            scale_by_temperature_sq=self.scale_by_temperature_sq, ensemble=self.ensemble,
            teacher_weights=self.teacher_weights if teacher_weights is None else teacher_weights, beta=self.beta,
            skew=self.skew, ignore_index=self.ignore_index, ce_weight=self.ce_weight, reduction=self.reduction,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={_setting_repr(v)}" for k, v in self.kd_settings().items())


class KDLoss(_KDSettings):
    """Fused distillation loss; see :func:`fastdistill.kd_loss` for every argument.

    Settings are attributes, read at every call (``loss_fn.temperature = 2.0`` takes effect at the next call); a
    tensor ``teacher_weights`` is a non-persistent buffer (it moves with ``.to(device)`` and keeps its dtype under
    ``.half()``; like the other settings it is not in ``state_dict()``).

    Example::

        loss_fn = KDLoss(temperature=2.0, ce_weight=0.1)
        loss = loss_fn(student_logits, teacher_logits, labels)
    """

    skips_ignored_positions = True  # every term 0 where the label is ignore_index: training.loop moves labels
    # num_items, labels and sample_weight checked as kd_loss checks them: the loop vouches for its own (no syncs)
    values_as_kd_loss = True

    def labels_only_skip(self) -> bool:
        """Whether the labels are read for nothing but which rows to skip (no hard-label term): then
        :class:`~fastdistill.training.DistillationLoop` gives an unlabelled batch its ``attention_mask`` as labels
        that only mask, so that padding carries no loss."""
        return self.ce_weight == 0

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
        super().__init__(
            divergence=divergence, temperature=temperature, scale_by_temperature_sq=scale_by_temperature_sq,
            ensemble=ensemble, teacher_weights=teacher_weights, beta=beta, skew=skew, ignore_index=ignore_index,
            ce_weight=ce_weight, reduction=reduction, backend=backend,
        )  # fmt: skip

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: functional.TeacherLogits,
        labels: Tensor | None = None,
        *,
        sample_weight: Tensor | None = None,
        teacher_weights: Tensor | Sequence[float] | None = None,
        num_items: int | Tensor | None = None,
    ) -> Tensor:
        """student_logits [*, V]; teacher_logits [*, V], [K, *, V] or K x [*, V]; labels int64 [*].
        ``teacher_weights`` here overrides the one given at construction."""
        return functional.kd_loss(student_logits, teacher_logits, labels=labels, sample_weight=sample_weight,
                                  num_items=num_items, **self.kd_settings(teacher_weights))  # fmt: skip


POOLINGS = ("cls", "mean", "none")
BASELINES = ("learned", "constant")


def _projection(d_in: int, d_out: int, hidden: int | None) -> nn.Module:
    if hidden is None:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _check_dim(name: str, value, *, allow_none: bool = False) -> int | None:
    """``value`` as an int (numpy integers included), or None where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class CodistillLoss(nn.Module):
    """Co-training with co-distillation of two models; see :func:`fastdistill.codistill_loss` for every argument.

    ``forward`` returns ``CodistillLosses(loss_a, loss_b)``; backpropagate their sum to train both models. In
    :class:`fastdistill.training.DistillationLoop` use it with one teacher and ``train_teachers=True``: the student
    is model a, the teacher model b, and the loop logs both losses.

    ``burn_in_steps``: the first optimizer steps train each model on its hard loss alone (both distillation weights
    0), as Anil et al. (2018) start codistillation only after a burn-in, when the models' predictions are worth
    learning from. The loop reports its progress before every optimizer step (:meth:`set_progress`); used by hand,
    call it yourself (before it is called the loss counts as step 0).

    Example::

        loss_fn = CodistillLoss(temperature=2.0, weight_ab=1.0, weight_ba=0.5)
        loss_a, loss_b = loss_fn(logits_a, logits_b, labels)
        (loss_a + loss_b).backward()
    """

    skips_ignored_positions = True  # every term 0 where the label is ignore_index: training.loop moves labels
    # num_items, labels and sample_weight checked as kd_loss checks them: the loop vouches for its own (no syncs)
    values_as_kd_loss = True

    def labels_only_skip(self) -> bool:
        """Whether the labels are read for nothing but which rows to skip (no hard-label term): then
        :class:`~fastdistill.training.DistillationLoop` gives an unlabelled batch its ``attention_mask`` as labels
        that only mask, so that padding carries no loss."""
        h = self.hard_weight  # None: 1 with labels (mask labels would be learnt from)
        return h is not None and all(x == 0 for x in (h if isinstance(h, tuple | list) else (h,)))

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        weight_ab: float = 1.0,
        weight_ba: float = 1.0,
        hard_weight: float | tuple[float, float] | list[float] | None = None,
        divergence: str = "kl",
        scale_by_temperature_sq: bool = True,
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        burn_in_steps: int = 0,
    ) -> None:
        super().__init__()
        functional.check_hyperparameters(
            divergence=divergence, temperature=temperature, ensemble="prob_mean", beta=beta, skew=skew,
            ce_weight=0.0, reduction=reduction, backend=backend, ignore_index=ignore_index,
            scale_by_temperature_sq=scale_by_temperature_sq,
        )  # fmt: skip
        functional.check_codistill_weights(weight_ab, weight_ba, hard_weight)
        # progress as last reported (plain attributes, not state: the loop reports it before every step, so a
        # resumed run needs nothing from a checkpoint); forward reads only whether distillation is on, so a compiled
        # step sees two values (two graphs at most), not a new step number on every call
        self.step = 0
        self.weight_ab = weight_ab
        self.weight_ba = weight_ba
        self.hard_weight = hard_weight
        self.burn_in_steps = burn_in_steps  # (checked against hard_weight by its setter)
        self.temperature = temperature
        self.divergence = divergence
        self.scale_by_temperature_sq = scale_by_temperature_sq
        self.beta = beta
        self.skew = skew
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        logits_a: Tensor,
        logits_b: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        *,
        sample_weight: Tensor | None = None,
        num_items: int | Tensor | None = None,
    ) -> functional.CodistillLosses:
        """logits_a, logits_b [*, V] (logits_b may also be a one-element list or a [1, *, V] tensor: the loop's
        teacher list); labels int64 [*]."""
        functional._check_logits("logits_a", logits_a)
        if isinstance(logits_b, Sequence) or (isinstance(logits_b, Tensor) and logits_b.dim() == logits_a.dim() + 1):
            if len(logits_b) != 1:
                raise ValueError(f"CodistillLoss trains two models: logits_b must be one model's logits, got "
                                 f"{len(logits_b)} (use one teacher)")  # fmt: skip
            logits_b = logits_b[0]
        if self.burn_in_steps and labels is None:
            raise ValueError("burn_in_steps > 0 trains on the hard losses alone at first: it needs labels")
        distilling = self._distilling
        if not distilling:  # the weights are passed as 0 during burn-in: check the set ones now, not steps later
            functional.check_codistill_weights(self.weight_ab, self.weight_ba, self.hard_weight)
        return functional.codistill_loss(
            logits_a, logits_b, labels, temperature=self.temperature,
            weight_ab=self.weight_ab if distilling else 0.0, weight_ba=self.weight_ba if distilling else 0.0,
            hard_weight=self.hard_weight, divergence=self.divergence,
            scale_by_temperature_sq=self.scale_by_temperature_sq, beta=self.beta, skew=self.skew,
            ignore_index=self.ignore_index, sample_weight=sample_weight, reduction=self.reduction,
            num_items=num_items, backend=self.backend,
        )  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_burn_in_steps" not in state:  # pickled before burn_in_steps was a property: a plain attribute then
            state["_burn_in_steps"] = state.pop("burn_in_steps", 0)
        super().__setstate__(state)

    @property
    def burn_in_steps(self) -> int:
        """Optimizer steps trained on the hard losses alone; settable (checked, and in effect at the next call)."""
        return self._burn_in_steps

    @burn_in_steps.setter
    def burn_in_steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"burn_in_steps must be an int >= 0, got {value!r}")
        hard = functional.check_codistill_weights(self.weight_ab, self.weight_ba, self.hard_weight)[2]
        if value and hard is not None and max(hard) == 0:
            raise ValueError("burn_in_steps > 0 trains on the hard losses alone at first: hard_weight must not be 0")
        self._burn_in_steps = value
        self._distilling = self.step >= value

    def set_progress(self, step: int, total_steps: int | None = None) -> None:
        """Where training is: ``step`` optimizer steps done (0-based); the distillation terms start at
        ``step == burn_in_steps``. ``total_steps`` is not used (the loop's signature)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step = step
        self._distilling = step >= self._burn_in_steps

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, weight_ab={self.weight_ab}, weight_ba={self.weight_ba}, "
            f"hard_weight={self.hard_weight}, divergence={self.divergence!r}, "
            f"scale_by_temperature_sq={self.scale_by_temperature_sq}, beta={self.beta}, skew={self.skew}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"
            + (f", burn_in_steps={self.burn_in_steps}" if self.burn_in_steps else "")
        )


def _check_hidden(name: str, hidden) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"{name} must be a Tensor [N, D] or [B, L, D], got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"{name} must be floating point (hidden states), got {hidden.dtype}")


class MIAlphaLoss(nn.Module):
    """Distiller's MI-alpha feature term: minus the MI-alpha estimate between projected student and teacher
    representations (SPEC §2, §6), with a learned separable critic f(x, y) = <g_s(x), g_t(y)> and log-baseline a(y).

    g_s, g_t are linear maps to ``proj_dim`` (2-layer MLPs with ``hidden_dim`` hidden units when it is set);
    with ``baseline="learned"`` a is a small MLP on the teacher's (pooled) features of each example, initialised to
    the constant 1 (so alpha = 0 starts exactly at NWJ); ``baseline="constant"`` fixes a = 1. Train these
    parameters together with the student: they tighten the bound, the student raises it.

    The defaults follow Distiller's released setup (alpha = 0.9, L2-normalised projections, each student row
    normalised over the batch's teachers: ``anchor="student"``, a baseline network on the teacher); temperature
    0.1 is ours. ``alpha``, ``critic``, ``temperature`` and ``anchor`` are :func:`fastdistill.mi_alpha`'s.

    ``forward(student_hidden, teacher_hidden, attention_mask=None)`` takes [N, D_s] and [N, D_t] rows, or
    [B, L, D_s] and [B, L, D_t] hidden states pooled per ``pooling``: "cls" (position 0), "mean" (over unmasked
    positions) or "none" (every unmasked token is a row: the same [B, L] layout and mask for both). It returns
    the loss ``-estimate`` (0-dim); :meth:`estimate` returns the estimate itself. ``attention_mask`` [B, L]: bool
    or 0/1, nonzero positions kept (both poolings read it so; with "mean" an item with no kept position pools to a
    zero row, as sentence-transformers' mean pooling does, and still counts as a sample: dropping it would need a
    data-dependent row count). Pooling "none" with a mask selects the kept rows
    with ``nonzero`` (a row count known only from the data): ``torch.compile(fullgraph=True)`` captures it, a
    default compile breaks the graph there unless ``torch._dynamo.config.capture_dynamic_output_shape_ops``.

    Example::

        mi = MIAlphaLoss(student_dim=384, teacher_dim=768, pooling="mean")
        loss = task_loss + 0.1 * mi(student_out.hidden_states[-1], teacher_out.hidden_states[-1], mask)
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        alpha: float = 0.9,
        critic: str = "cosine",
        temperature: float = 0.1,
        anchor: str = "student",
        baseline: str = "learned",
        pooling: str = "cls",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        student_dim, teacher_dim = _check_dim("student_dim", student_dim), _check_dim("teacher_dim", teacher_dim)
        proj_dim, hidden_dim = _check_dim("proj_dim", proj_dim), _check_dim("hidden_dim", hidden_dim, allow_none=True)
        functional.check_choice("critic", critic, reference.CRITICS)
        functional.check_choice("anchor", anchor, reference.ANCHORS)
        functional.check_choice("baseline", baseline, BASELINES)
        functional.check_choice("pooling", pooling, POOLINGS)
        functional.check_choice("backend", backend, BACKENDS_NAMES)
        self.alpha = functional.check_real("alpha", alpha, low=0.0, high=1.0, low_open=False, high_open=False)
        self.temperature = functional.check_temperature(temperature)  # mi_alpha's range, checked at construction
        self.critic, self.anchor, self.pooling, self.backend = critic, anchor, pooling, backend
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.student_proj = _projection(student_dim, proj_dim, hidden_dim)
        self.teacher_proj = _projection(teacher_dim, proj_dim, hidden_dim)
        self.baseline: nn.Module | None = None
        if baseline == "learned":
            width = hidden_dim or proj_dim
            self.baseline = nn.Sequential(nn.Linear(teacher_dim, width), nn.ReLU(), nn.Linear(width, 1))
            nn.init.zeros_(self.baseline[2].weight)
            nn.init.constant_(self.baseline[2].bias, 1.0)

    def pool(self, hidden: Tensor, attention_mask: Tensor | None, name: str, width: int,
             rows: Tensor | None = None) -> Tensor:  # fmt: skip
        """[N, D] rows from [N, D] (as is) or [B, L, D] hidden states per ``self.pooling``; D must be ``width``.
        ``rows``: for pooling "none" with a mask, the kept positions (flat indices into B * L; default: the mask's
        nonzero ones), so that two calls can share one index set."""
        _check_hidden(name, hidden)
        functional.check_choice("pooling", self.pooling, POOLINGS)  # (a setting changed after construction)
        if hidden.dim() in (2, 3) and hidden.shape[-1] != width:
            raise ValueError(f"{name} has width D = {hidden.shape[-1]}, but this MIAlphaLoss was built for "
                             f"{name.split('_')[0]}_dim = {width}")  # fmt: skip
        if hidden.dim() == 2:
            if attention_mask is not None:
                raise ValueError(f"attention_mask is for [B, L, D] hidden states; {name} is [N, D]")
            return hidden
        if hidden.dim() != 3:
            raise ValueError(f"{name} must be [N, D] or [B, L, D], got shape {tuple(hidden.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"attention_mask must be [B, L] = {list(hidden.shape[:2])}, got "
                             f"{list(attention_mask.shape)}")  # fmt: skip
        if self.pooling == "cls":
            if hidden.shape[1] == 0:
                raise ValueError(f"pooling='cls' takes position 0 of {name} [B, L, D], which has L = 0")
            return hidden[:, 0]
        if self.pooling == "mean":
            if attention_mask is None:
                return hidden.mean(1)
            # kept positions (nonzero, as pooling "none" reads the mask), each counted once
            m = (attention_mask != 0).to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        if attention_mask is None:
            return hidden.reshape(-1, hidden.shape[-1])
        if rows is None:
            rows = attention_mask.reshape(-1).nonzero().squeeze(1)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

    def estimate(self, student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The MI-alpha estimate in nats (0-dim; float32, float64 for a float64 module) for a batch; see the class
        docstring for shapes."""
        _check_hidden("student_hidden", student_hidden)
        _check_hidden("teacher_hidden", teacher_hidden)
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.is_complex():
                got = attention_mask.dtype if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                raise TypeError(f"attention_mask must be a bool or 0/1 Tensor [B, L] (nonzero: kept), got {got}")
            functional._check_device("attention_mask", attention_mask, student_hidden.device, ref="student_hidden")
        # hidden states of another float dtype than the projections (bf16 from an autocast forward, a float32 module
        # called outside it): cast to the projections' dtype first, as their matmuls need (upcasting is exact, and
        # the pooling then sums in that dtype too)
        student_hidden = student_hidden.to(next(self.student_proj.parameters()).dtype)
        teacher_hidden = teacher_hidden.to(next(self.teacher_proj.parameters()).dtype)
        rows = None
        if self.pooling == "none" and attention_mask is not None and student_hidden.dim() == 3:
            # one index set for both sides: one row count, also to torch.compile (two masks would give two sizes
            # it cannot tell are equal, and the check below would break a fullgraph compile)
            rows = attention_mask.reshape(-1).nonzero().squeeze(1)
        xs = self.pool(student_hidden, attention_mask, "student_hidden", self.student_dim, rows)
        ys = self.pool(teacher_hidden, attention_mask, "teacher_hidden", self.teacher_dim, rows)
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"student_hidden gives {xs.shape[0]} rows but teacher_hidden gives {ys.shape[0]}; "
                             "row i of both must be the same example")  # fmt: skip
        u, v = self.student_proj(xs), self.teacher_proj(ys)
        a = self.baseline(ys).squeeze(-1) if self.baseline is not None else 1.0
        if isinstance(a, Tensor) and a.dtype != torch.float64:
            a = a.float()
        # the baseline is this module's own output, finite when the features are (which mi_alpha does not check
        # either): its value check would be a device sync in every training step
        with functional.values_checked():
            return functional.mi_alpha(u, v, alpha=self.alpha, log_baseline=a, critic=self.critic,
                                       temperature=self.temperature, anchor=self.anchor,
                                       backend=self.backend)  # fmt: skip

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The loss to minimise: ``-estimate`` (0-dim)."""
        return -self.estimate(student_hidden, teacher_hidden, attention_mask)

    def extra_repr(self) -> str:
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, alpha={self.alpha}, "
                f"critic={self.critic!r}, temperature={self.temperature}, anchor={self.anchor!r}, "
                f"baseline={'learned' if self.baseline is not None else 'constant'!r}, pooling={self.pooling!r}, "
                f"backend={self.backend!r}")  # fmt: skip
