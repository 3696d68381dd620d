"""One record per op: the validated, flattened arguments of an op call, and the one Python statement of the op's
argument list.

Each record class names its op (``OP``) and lists the op's arguments in schema order (``ARGS``: name and schema
type, the order of ``TORCH_LIBRARY`` in ``csrc/fastdistill.cpp``; ``tests/test_registration.py`` holds the two to
each other). Everything else reads arguments by name: ``kernel_args`` builds the argument tuple of a call, the fake
kernels, autograd and the Triton wrappers read a call's arguments with ``arg`` / ``named``, and the Triton ops take
their schema from ``schema``. The generic backends of :mod:`fastdistill.ops.dispatch` run any record through three
methods: ``extension`` (``torch.ops.fastdistill.<OP>``), ``triton`` and ``reference``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from . import divergences, eager, reference

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# schema type -> Python annotation (torch.library infers the schema back from these)
_PY_TYPES = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "Tensor[]": list[Tensor], "str": str, "float": float,
             "float[]": list[float], "int": int, "bool": bool}  # fmt: skip


class OpInputs:
    """What the op records share: the argument list and name-based access to a call's arguments."""

    OP: ClassVar[str]
    ARGS: ClassVar[tuple[tuple[str, str], ...]]  # (name, schema type), schema order
    RETURNS: ClassVar[str]
    _NAMES: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._NAMES = tuple(name for name, _ in cls.ARGS)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The op's argument names, in schema order."""
        return cls._NAMES

    @classmethod
    def index(cls, name: str) -> int:
        """The position of argument ``name`` in a call of the op."""
        return cls.names().index(name)

    @classmethod
    def arg(cls, args: tuple, name: str) -> Any:
        """Argument ``name`` of a call's positional arguments ``args``."""
        return args[cls.index(name)]

    @classmethod
    def named(cls, args: tuple) -> SimpleNamespace:
        """A call's positional arguments by name."""
        if len(args) != len(cls.ARGS):
            raise TypeError(f"fastdistill::{cls.OP} takes {len(cls.ARGS)} arguments, got {len(args)}")
        return SimpleNamespace(**dict(zip(cls.names(), args)))

    @classmethod
    def bind(cls, **values: Any) -> tuple:
        """The positional arguments of a call from its arguments by name (all of them)."""
        if values.keys() != set(cls._NAMES):
            missing, extra = set(cls._NAMES) - values.keys(), values.keys() - set(cls._NAMES)
            raise TypeError(f"fastdistill::{cls.OP}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        return tuple(values[name] for name in cls._NAMES)

    def _args(self, **computed: Any) -> tuple:
        """This record's op arguments: the ``computed`` ones, the rest the record's fields of the same name."""
        return tuple(computed[n] if n in computed else getattr(self, n) for n in self._NAMES)

    @classmethod
    def schema(cls, **types: str) -> str:
        """The schema ``(args) -> returns``, with the types of some arguments replaced (the Triton twins take the
        teachers stacked: ``teachers="Tensor"``) and ``returns=`` to replace the outputs."""
        returns = types.pop("returns", cls.RETURNS)
        return "(" + ", ".join(f"{types.get(n, t)} {n}" for n, t in cls.ARGS) + ") -> " + returns

    @classmethod
    def typed(cls, fn, **types: str):
        """``fn(*args)`` with the op's signature (``schema``'s types, annotations included), so that
        ``torch.library`` infers the op's schema from it: the Triton twins are defined from the record."""
        returns = types.pop("returns", cls.RETURNS)
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_PY_TYPES[types.get(n, t)])
                  for n, t in cls.ARGS]  # fmt: skip
        outs = tuple(_PY_TYPES[t.strip()] for t in returns.strip("()").split(","))
        fn.__signature__ = inspect.Signature(params, return_annotation=tuple[outs])  # type: ignore[valid-type]
        return fn

    def tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def reasons(self, kind: str) -> list[str]:
        """What this op cannot do with these inputs on a backend of ``kind`` ("extension", "triton")."""
        return []

    def extension(self) -> Any:
        """Run ``torch.ops.fastdistill.<OP>`` and return the op's user-facing result."""
        raise NotImplementedError

    def triton(self) -> Any:
        raise NotImplementedError

    def reference(self) -> Any:
        raise NotImplementedError


def _grad_on(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# A fused backend writes the gradient in the forward pass, in the logits' dtype, and backward multiplies it by
# grad_output. For float16 that comes too late for a loss scaler (torch.amp.GradScaler): entries under float16's range
# (~6e-8, and a "mean" over N rows divides each by N) are 0 before the scale could lift them. Where the gradient has a
# bound, the kernel is given sample weights times a power of two S that lifts the bound to FP16_GRAD_TOP, and the
# loss is divided by S: backward's factor becomes grad_output / S, applied in float32 (registration._scale), one
# rounding. At grad_output 1 an entry in float16's normal range comes back bit for bit (S is a power of two).
FP16_GRAD_TOP = 2.0**14  # the bound's place: under float16's largest value (65504), with room
FP16_PRESCALE_MAX = 2.0**40  # float16 spans 2^-24 .. 2^16: no gradient needs more
FP16_WEIGHT_MAX = 2.0**64  # the largest sample weight x S: row losses and their sum far from float32's max


def _fp16_prescale(logits: Tensor, coefficient: float | None, sample_weight: Tensor | None,
                   denominator: Tensor | None, reduce: bool) -> Tensor | None:  # fmt: skip
    """S (0-dim float32 on the logits' device, computed there: no host sync) for the gradient of ``logits`` [N, V]
    whose entries are at most ``coefficient`` x the row weight (sample_weight [N] or 1) / denominator (when
    ``reduce``), or None: not float16, no rows, or no bound (``coefficient`` None). A power of two in
    [1, FP16_PRESCALE_MAX]: it only lifts."""
    if logits.dtype != torch.float16 or coefficient is None or logits.shape[0] == 0:
        return None
    bound = torch.full((), coefficient, dtype=torch.float32, device=logits.device)
    limit = None
    if sample_weight is not None:
        w_max = sample_weight.amax()
        bound = bound * w_max
        limit = FP16_WEIGHT_MAX / w_max  # the kernel's weights x S (and the loss x S) stay finite in float32
    if reduce and denominator is not None:
        bound = bound / denominator
    target = FP16_GRAD_TOP / bound if limit is None else torch.minimum(FP16_GRAD_TOP / bound, limit)
    _, exponent = torch.frexp(target)  # target = m 2^e, m in [0.5, 1)
    # 2^(e - 1) <= target; a bound of 0 (inf) or NaN gives a meaningless e, clamped to S = 1
    return torch.ldexp(torch.ones_like(bound), exponent - 1).clamp(1.0, FP16_PRESCALE_MAX)


def _weighted_by(sample_weight: Tensor | None, s: Tensor | None, n: int) -> Tensor | None:
    """The sample weights [N] the kernel takes under the prescale ``s``: s x sample_weight, or s for each of the
    ``n`` rows; ``sample_weight`` itself without one."""
    if s is None:
        return sample_weight
    return s.expand(n).contiguous() if sample_weight is None else sample_weight * s


def _unscaled(loss: Tensor, s: Tensor | None) -> Tensor:
    """The op's loss (0-dim or [N]) divided by its prescale ``s``: exact (a power of two)."""
    return loss if s is None else loss / s


def student_gradient_bounded(divergence: str, beta: float, skew: float, ce_weight: float) -> bool:
    """Whether kd_loss's student gradient has a bound with these settings (``_student_coefficient`` not None), so
    that float16 logits can take a prescale: every divergence but reverse_kl and skew_reverse_kl at skew 0, or
    ce_weight = 1 (the hard-label term alone)."""
    params = divergences.param_vector(divergence, {"beta": beta, "skew": skew})
    return _student_coefficient(divergence, params, 1.0 - ce_weight, 1.0, ce_weight) is not None


def _student_coefficient(divergence: str, div_params: list[float], kd_scale: float, temperature: float,
                         ce_weight: float) -> float | None:  # fmt: skip
    """A bound on |d(row loss) / d(student logit)| per unit row weight: kd_scale / T x the divergence's bound
    (divergences.py) + ce_weight (|softmax - one-hot| <= 1); None where the divergence has none."""
    if kd_scale == 0:
        return ce_weight
    bound = divergences.get(divergence).grad_bound(div_params)
    return None if bound is None else kd_scale / temperature * bound + ce_weight


def _dtype_reasons(logits: list[Tensor]) -> list[str]:
    dtypes = {t.dtype for t in logits}
    if not dtypes <= set(SUPPORTED_DTYPES):
        return [f"logits must be float32/float64/bfloat16/float16, got {sorted(map(str, dtypes))}"]
    return []


def _triton_row_dtype_reasons(logits: list[Tensor]) -> list[str]:
    """The row kernels (kd_loss, codistill_loss) are compiled for float32 / bfloat16 / float16 logits only
    (triton/launch.py: ROW_KERNEL_GPU_DTYPES); float64 runs in the interpreter (tests), on a GPU on the reference."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and any(t.dtype == torch.float64 for t in logits):
        return ["float64 logits: the Triton kernels are compiled for float32/bfloat16/float16 (the reference "
                "backend computes float64 exactly)"]  # fmt: skip
    return []


def _kernel_dtypes(student: Tensor, teachers: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The dtypes the fused kernels take: float64 everywhere when any input is float64 (computed in float64), and
    one dtype for all teachers (their promotion: a copy only when they differ)."""
    if reference.compute_dtype(student, *teachers) == torch.float64:
        return student.double(), [t.double() for t in teachers]
    if len({t.dtype for t in teachers}) > 1:
        common = teachers[0].dtype
        for t in teachers[1:]:
            common = torch.promote_types(common, t.dtype)
        teachers = [t.to(common) for t in teachers]
    return student, teachers


def stacked_teachers(teachers: list[Tensor]) -> bool:
    """Whether an op's ``teachers`` argument is one stacked [K, N, V] tensor (a list holding it) rather than K
    tensors [N, V]."""
    return len(teachers) == 1 and teachers[0].dim() == 3


def op_teachers(student: Tensor, teachers: list[Tensor]) -> tuple[bool, int]:
    """(stacked, K) of an op's ``teachers`` argument for its student [N, V], checked as the kernels check it
    (csrc/kd_teachers.h): K tensors [N, V] or one [K, N, V], 1 <= K <= MAX_TEACHERS. The fake kernels call it, so
    that torch.compile refuses at trace time what the kernels would refuse at run time."""
    stacked = stacked_teachers(teachers)
    k = teachers[0].shape[0] if stacked else len(teachers)
    most = KDInputs.MAX_TEACHERS
    torch._check_value(1 <= k and k <= most, lambda: f"teachers: kd_loss takes 1 to {most}, got K = {k}")
    for t in teachers:
        row = t.shape[1:] if stacked else t.shape
        torch._check_value(row == student.shape, lambda: f"teachers: K [N, V] or one [K, N, V] for the student's "
                                                         f"[N, V] = {list(student.shape)}, got {list(t.shape)}")
    return stacked, k


def gradient_slots(grad_teachers: int, k: int, stacked: bool) -> list[int]:
    """Teacher k's slot in the teachers' gradient (the M teachers whose bit of ``grad_teachers`` is set, in order;
    the Triton twin's [M, N, V] tensor), -1 for one that gets none. A stacked [K, N, V] input is one tensor: all K
    bits or none (the C++ op's bindings check the same, csrc/kd_teachers.h)."""
    on = [bool((grad_teachers >> i) & 1) for i in range(k)]
    if grad_teachers >> k:
        raise ValueError(f"grad_teachers: a mask of K = {k} teachers' bits, got {grad_teachers:#b}")
    if stacked and any(on) and not all(on):
        raise ValueError(f"grad_teachers: one stacked [K, N, V] tensor has one gradient: all {k} bits or none, "
                         f"got {grad_teachers:#b}")  # fmt: skip
    return [sum(on[:i]) if on[i] else -1 for i in range(k)]


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _widened(x: Tensor, on: bool) -> Tensor:
    """``x`` cast to float32 when it is float16 and ``on``. For a float16 gradient that no prescale lifts (a
    divergence without a bound, a teacher's gradient): the fused kernel forms it in float32 on the copy, and the
    cast's backward narrows it to float16 after grad_output (a loss scaler's factor), as eager autograd does, at the
    cost of the copies; written in float16 in the forward pass, entries under ~6e-8 would be 0 (a "mean" over N rows
    divides each by N: at N = 4096, V = 2000, reverse KL lost 8 % of the student's entries)."""
    return x.float() if on and x.dtype == torch.float16 else x


@dataclass
class KDInputs(OpInputs):
    """Arguments of :func:`fastdistill.kd_loss`, validated and flattened (math: :func:`reference.kd_loss`)."""

    OP: ClassVar[str] = "kd_loss"
    ARGS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("student", "Tensor"),  # [N, V]
        ("teachers", "Tensor[]"),  # K x [N, V], or one stacked [K, N, V] tensor
        ("teacher_weights", "Tensor?"),  # [K, N], columns sum to 1
        ("labels", "Tensor?"),  # int64 [N]
        ("sample_weight", "Tensor?"),  # [N]
        ("denominator", "Tensor?"),  # 0-dim
        ("divergence", "str"),
        ("ensemble", "str"),
        ("temperature", "float"),
        ("kd_scale", "float"),  # (1 - ce_weight) * (T^2 or 1)
        ("ce_weight", "float"),
        ("div_params", "float[]"),  # the divergence's parameters (ops/divergences.py)
        ("ignore_index", "int"),
        ("reduce", "bool"),
        ("grad_student", "bool"),
        ("grad_teachers", "int"),  # bit k: teacher k's gradient
    )
    RETURNS: ClassVar[str] = "(Tensor, Tensor, Tensor[])"
    MAX_TEACHERS: ClassVar[int] = 16  # per-row state lives in fixed-size arrays in the kernels (cpu, Triton)

    student: Tensor
    teachers: list[Tensor]
    teachers_stacked: Tensor | None  # [K, N, V] view of the caller's tensor when it came stacked (or K = 1)
    teacher_weights: Tensor | None
    labels: Tensor | None
    sample_weight: Tensor | None
    denominator: Tensor | None
    divergence: str
    ensemble: str
    temperature: float
    kd_scale: float
    ce_weight: float
    div_params: list[float]
    ignore_index: int
    reduce: bool

    def tensors(self) -> list[Tensor]:
        optional = [self.teacher_weights, self.labels, self.sample_weight, self.denominator]
        return [self.student, *self.teachers, *(t for t in optional if t is not None)]

    def reasons(self, kind: str) -> list[str]:
        logits = [self.student, *self.teachers]
        reasons = []
        if len(self.teachers) > self.MAX_TEACHERS:
            reasons.append(f"takes at most {self.MAX_TEACHERS} teachers, got K = {len(self.teachers)}")
        reasons += _dtype_reasons(logits)
        if kind == "triton":
            reasons += _triton_row_dtype_reasons(logits)
        return reasons

    def kernel_args(self) -> tuple[tuple, Tensor | None]:
        """The op's arguments for this call (the C++ op's and the Triton twin's alike): kernel dtypes, the gradient
        flags of this call, the student and the teachers of unit stride along V, the teachers as the caller's one
        stacked [K, N, V] tensor where it came so and needs no cast (one autograd input: its gradient is written in
        place, never re-stacked from K [N, V] ones), else K tensors [N, V]; and the float16 prescale S the op's
        loss is to be divided by (None: none, see ``_fp16_prescale``)."""
        student, teachers = _kernel_dtypes(self.student, self.teachers)
        # only the teachers that need one get a gradient buffer (a stacked tensor: all of them or none)
        grad_teachers = sum(1 << k for k, t in enumerate(self.teachers) if _grad_on(t))
        grad_student = _grad_on(student)
        s = None
        if grad_student and not grad_teachers:  # (teachers' gradients have no bound: not prescaled)
            s = self.fp16_lift(student, self.sample_weight)
        wide_student = s is None and grad_student  # float16 gradients no prescale lifts: formed in float32
        wide_teachers = s is None and bool(grad_teachers)
        t = self.teachers_stacked
        # (unit stride first: a cast keeps a dense tensor's strides, so the other order copies a transposed one twice)
        if t is not None and teachers[0].dtype == t.dtype:
            teachers = [_widened(_unit_stride(t), wide_teachers)]
        else:  # the Triton twin reads them in place in an eager call (kd_loss.teacher_layout)
            teachers = [_widened(_unit_stride(x), wide_teachers) for x in teachers]
        student = _widened(_unit_stride(student), wide_student)
        weights = _weighted_by(self.sample_weight, s, student.shape[0])
        args = self._args(student=student, teachers=teachers, sample_weight=weights, grad_student=grad_student,
                          grad_teachers=grad_teachers)  # fmt: skip
        return args, s

    def fp16_lift(self, student: Tensor, sample_weight: Tensor | None) -> Tensor | None:
        """The float16 prescale S (``_fp16_prescale``) of the gradient of ``student`` [N, V] (these inputs' student
        as the kernels take it) for rows weighted by ``sample_weight``: the call's own [N], or the weights of every
        row a caller's chunks come from (fused_linear: one S for all its chunks, at least as small as each chunk's)."""
        coefficient = _student_coefficient(self.divergence, self.div_params, self.kd_scale, self.temperature,
                                           self.ce_weight)  # fmt: skip
        return _fp16_prescale(student, coefficient, sample_weight, self.denominator, self.reduce)

    def extension(self) -> Tensor:
        args, s = self.kernel_args()
        return _unscaled(eager.call(torch.ops.fastdistill.kd_loss, args)[0], s)

    def triton(self) -> Tensor:
        from .triton.kd_loss import kd_loss_triton

        args, s = self.kernel_args()
        return _unscaled(eager.call(kd_loss_triton, args)[0], s)

    def reference(self) -> Tensor:
        return reference.kd_loss(
            self.student, self.teachers, teacher_weights=self.teacher_weights, labels=self.labels,
            sample_weight=self.sample_weight, denominator=self.denominator, divergence_kind=self.divergence,
            ensemble=self.ensemble, temperature=self.temperature, kd_scale=self.kd_scale, ce_weight=self.ce_weight,
            div_params=self.div_params, ignore_index=self.ignore_index, reduce=self.reduce,
        )  # fmt: skip


@dataclass
class CodistillInputs(OpInputs):
    """Arguments of :func:`fastdistill.codistill_loss`, validated and flattened (math:
    :func:`reference.codistill_loss`)."""

    OP: ClassVar[str] = "codistill_loss"
    ARGS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("a", "Tensor"),  # [N, V]
        ("b", "Tensor"),  # [N, V]
        ("labels", "Tensor?"),
        ("sample_weight", "Tensor?"),
        ("denominator", "Tensor?"),
        ("divergence", "str"),
        ("temperature", "float"),
        ("kd_scale", "float"),  # T^2 or 1
        ("weight_ab", "float"),  # a -> b: in loss_b
        ("weight_ba", "float"),  # b -> a: in loss_a
        ("hard_a", "float"),
        ("hard_b", "float"),
        ("div_params", "float[]"),
        ("ignore_index", "int"),
        ("reduce", "bool"),
        ("grad_a", "bool"),
        ("grad_b", "bool"),
    )
    RETURNS: ClassVar[str] = "(Tensor, Tensor, Tensor, Tensor)"

    a: Tensor
    b: Tensor
    labels: Tensor | None
    sample_weight: Tensor | None
    denominator: Tensor | None
    divergence: str
    temperature: float
    kd_scale: float
    weight_ab: float
    weight_ba: float
    hard_a: float
    hard_b: float
    div_params: list[float]
    ignore_index: int
    reduce: bool

    def tensors(self) -> list[Tensor]:
        optional = [self.labels, self.sample_weight, self.denominator]
        return [self.a, self.b, *(t for t in optional if t is not None)]

    def reasons(self, kind: str) -> list[str]:
        return _triton_row_dtype_reasons([self.a, self.b]) if kind == "triton" else []

    def kernel_args(self, unit_stride: bool = False) -> tuple[tuple, Tensor | None]:
        """The op's arguments with the gradient flags of this call (a and b in one dtype: their promotion, a copy
        only when they differ; rows of unit stride along V for the Triton twin), and the float16 prescale S both
        losses are to be divided by (None: none; see ``_fp16_prescale``)."""
        a, b = self.a, self.b
        if a.dtype != b.dtype:
            common = torch.promote_types(a.dtype, b.dtype)
            a, b = a.to(common), b.to(common)
        if unit_stride:
            a, b = _unit_stride(a), _unit_stride(b)
        grad_a, grad_b = _grad_on(a), _grad_on(b)
        # each model's loss: kd_scale x its weight x D(other || own) + its hard weight x CE; S fits both gradients
        bounds = [_student_coefficient(self.divergence, self.div_params, self.kd_scale * w, self.temperature, hard)
                  for on, w, hard in ((grad_a, self.weight_ba, self.hard_a), (grad_b, self.weight_ab, self.hard_b))
                  if on]  # fmt: skip
        s = None
        if bounds and None not in bounds:
            s = _fp16_prescale(a, max(bounds), self.sample_weight, self.denominator, self.reduce)
        # float16 gradients no prescale lifts (a divergence without a bound): formed in float32 (one dtype for both)
        a, b = _widened(a, s is None and bool(bounds)), _widened(b, s is None and bool(bounds))
        weights = _weighted_by(self.sample_weight, s, a.shape[0])
        return self._args(a=a, b=b, sample_weight=weights, grad_a=grad_a, grad_b=grad_b), s

    def extension(self) -> tuple[Tensor, Tensor]:
        args, s = self.kernel_args()
        loss_a, loss_b, _, _ = eager.call(torch.ops.fastdistill.codistill_loss, args)
        return _unscaled(loss_a, s), _unscaled(loss_b, s)

    def triton(self) -> tuple[Tensor, Tensor]:
        from .triton.codistill_loss import codistill_loss_triton

        args, s = self.kernel_args(unit_stride=True)
        loss_a, loss_b, _, _ = eager.call(codistill_loss_triton, args)
        return _unscaled(loss_a, s), _unscaled(loss_b, s)

    def reference(self) -> tuple[Tensor, Tensor]:
        return reference.codistill_loss(
            self.a, self.b, labels=self.labels, sample_weight=self.sample_weight, denominator=self.denominator,
            divergence_kind=self.divergence, temperature=self.temperature, kd_scale=self.kd_scale,
            weight_ab=self.weight_ab, weight_ba=self.weight_ba, hard_a=self.hard_a, hard_b=self.hard_b,
            div_params=self.div_params, ignore_index=self.ignore_index, reduce=self.reduce,
        )  # fmt: skip


@dataclass
class MIInputs(OpInputs):
    """Arguments of :func:`fastdistill.mi_alpha`, validated (math: :func:`reference.mi_alpha`). The fused ops take
    the critic applied: unit-norm rows for "cosine" (its gradient from autograd through the normalisation)."""

    OP: ClassVar[str] = "mi_alpha"
    ARGS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("student", "Tensor"),  # [N, D], critic applied: the columns of S
        ("teacher", "Tensor"),  # [N, D]: the rows of S (the anchor; mi_alpha(anchor="student") swaps the sides)
        ("log_baseline", "Tensor"),  # [N], accumulation dtype
        ("alpha", "float"),
        ("temperature", "float"),
    )
    RETURNS: ClassVar[str] = "(Tensor, Tensor)"  # estimate (0-dim), stats [8, N]

    student: Tensor
    teacher: Tensor
    log_baseline: float | Tensor  # float, or [N]
    alpha: float
    critic: str
    temperature: float

    def tensors(self) -> list[Tensor]:
        extra = [self.log_baseline] if isinstance(self.log_baseline, Tensor) else []
        return [self.student, self.teacher, *extra]

    MAX_ROWS_FLOAT32: ClassVar[int] = 2**24  # the stats hold each row's argmax column in the accumulation dtype

    def reasons(self, kind: str) -> list[str]:
        n = self.student.shape[0]
        if reference.compute_dtype(self.student) == torch.float32 and n > self.MAX_ROWS_FLOAT32:
            return [f"takes at most 2**24 rows in float32 (its statistics store column indices as float32), got "
                    f"N = {n}"]  # fmt: skip
        return []

    def kernel_args(self) -> tuple:
        u, v = self.student, self.teacher
        acc = reference.compute_dtype(u)
        if self.critic == "cosine":  # normalised in float32 (and its backward), rounded once to the kernels' dtype
            u = torch.nn.functional.normalize(u.to(acc), dim=-1).to(u.dtype)
            v = torch.nn.functional.normalize(v.to(acc), dim=-1).to(v.dtype)
        a = self.log_baseline
        a = a.to(acc) if isinstance(a, Tensor) else torch.full((u.shape[0],), float(a), dtype=acc, device=u.device)
        return self._args(student=u.contiguous(), teacher=v.contiguous(), log_baseline=a.contiguous())

    def extension(self) -> Tensor:
        return eager.call(torch.ops.fastdistill.mi_alpha, self.kernel_args())[0]

    def triton(self) -> Tensor:
        from .triton.mi_alpha import mi_alpha_triton

        return eager.call(mi_alpha_triton, self.kernel_args())[0]

    def reference(self) -> Tensor:
        return reference.mi_alpha(self.student, self.teacher, alpha=self.alpha, log_baseline=self.log_baseline,
                                  critic=self.critic, temperature=self.temperature)  # fmt: skip


class MIBackwardArgs(OpInputs):
    """The argument list of ``fastdistill::mi_alpha_backward`` (autograd's call: registration.py)."""

    OP: ClassVar[str] = "mi_alpha_backward"
    ARGS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("grad", "Tensor"),  # 0-dim
        ("student", "Tensor"),
        ("teacher", "Tensor"),
        ("log_baseline", "Tensor"),
        ("stats", "Tensor"),  # [8, N] from the forward
        ("alpha", "float"),
        ("temperature", "float"),
    )
    RETURNS: ClassVar[str] = "(Tensor, Tensor)"
