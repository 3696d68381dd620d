"""Backend selection for the fused KD loss: every backend says what it cannot run, and why.

``backend="auto"`` picks the first backend in the device's priority list whose ``not_supported_reasons`` is
empty; a backend named explicitly either runs or raises ``ValueError`` listing its reasons. Adding a backend
means adding one class here (and its kernels elsewhere).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import extension, reference

BACKENDS_NAMES = ("auto", "cpu", "cuda", "triton", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class KDInputs:
    """Validated, flattened arguments of :func:`fastdistill.kd_loss` (see :mod:`fastdistill.ops.reference`)."""

    student: Tensor  # [N, V]
    teachers: list[Tensor]  # K x [N, V]
    teachers_stacked: Tensor | None  # [K, N, V] view of the caller's tensor when it came stacked (or K = 1)
    teacher_weights: Tensor | None  # [K, N], columns sum to 1
    labels: Tensor | None  # int64 [N]
    sample_weight: Tensor | None  # [N]
    denominator: Tensor | None  # 0-dim
    divergence: str
    ensemble: str
    temperature: float
    kd_scale: float
    ce_weight: float
    beta: float
    skew: float
    ignore_index: int
    reduce: bool

    def tensors(self) -> list[Tensor]:
        optional = [self.teacher_weights, self.labels, self.sample_weight, self.denominator]
        return [self.student, *self.teachers, *(t for t in optional if t is not None)]


def _dtype_reasons(inp: KDInputs) -> list[str]:
    dtypes = {t.dtype for t in [inp.student, *inp.teachers]}
    if not dtypes <= set(SUPPORTED_DTYPES):
        return [f"logits must be float32/float64/bfloat16/float16, got {sorted(map(str, dtypes))}"]
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


class Backend:
    name: str = ""

    def not_supported_reasons(self, inp: KDInputs) -> list[str]:
        raise NotImplementedError

    def __call__(self, inp: KDInputs) -> Tensor:
        raise NotImplementedError


class ExtensionBackend(Backend):
    """``torch.ops.fastdistill.<op>`` with a kernel in the C++ extension for ``device_type`` ("cpu": csrc/cpu,
    "cuda": csrc/cuda, not written yet); the backend's name is the device type."""

    op = ""
    device_type = ""

    @property
    def name(self) -> str:
        return self.device_type

    def not_supported_reasons(self, inp) -> list[str]:
        reasons = []
        if not extension.available():
            reasons.append(f"the fastdistill._C extension is not available ({extension.IMPORT_ERROR})")
        elif not extension.has_kernel(self.op, self.device_type.upper()):
            reasons.append(f"fastdistill._C has no {self.name} kernel for {self.op}")
        devices = {t.device.type for t in inp.tensors()}
        if devices != {self.device_type}:
            reasons.append(f"needs all tensors on {self.device_type}, got {sorted(devices)}")
        return reasons


class ReferenceBackend(Backend):
    """Pure PyTorch, autograd for gradients; runs anything, slowly."""

    name = "reference"

    def not_supported_reasons(self, inp: KDInputs) -> list[str]:
        return []

    def __call__(self, inp: KDInputs) -> Tensor:
        return reference.kd_loss(
            inp.student, inp.teachers, teacher_weights=inp.teacher_weights, labels=inp.labels,
            sample_weight=inp.sample_weight, denominator=inp.denominator, divergence_kind=inp.divergence,
            ensemble=inp.ensemble, temperature=inp.temperature, kd_scale=inp.kd_scale, ce_weight=inp.ce_weight,
            beta=inp.beta, skew=inp.skew, ignore_index=inp.ignore_index, reduce=inp.reduce,
        )  # fmt: skip


class _CustomOpBackend(ExtensionBackend):
    """A backend that runs ``torch.ops.fastdistill.kd_loss`` with a kernel for its device type."""

    op = "kd_loss"
    max_teachers = 16  # per-row state lives in fixed-size arrays in the kernels

    def not_supported_reasons(self, inp: KDInputs) -> list[str]:
        reasons = super().not_supported_reasons(inp)
        if len(inp.teachers) > self.max_teachers:
            reasons.append(f"takes at most {self.max_teachers} teachers, got K = {len(inp.teachers)}")
        return reasons + _dtype_reasons(inp)

    def __call__(self, inp: KDInputs) -> Tensor:
        student, teachers = _kernel_dtypes(inp.student, inp.teachers)
        grad_on = torch.is_grad_enabled()
        loss, _, _ = torch.ops.fastdistill.kd_loss(
            student, teachers, inp.teacher_weights, inp.labels, inp.sample_weight, inp.denominator,
            inp.divergence, inp.ensemble, inp.temperature, inp.kd_scale, inp.ce_weight, inp.beta, inp.skew,
            inp.ignore_index, inp.reduce, grad_on and student.requires_grad,
            grad_on and any(t.requires_grad for t in teachers),
        )  # fmt: skip
        return loss


class CpuBackend(_CustomOpBackend):
    """C++ kernel (csrc/cpu): ATen parallel_for over rows, SIMD inner loops."""

    device_type = "cpu"


class CudaBackend(_CustomOpBackend):
    """CUDA C++ kernel (csrc/cuda: not written yet, so never registered; its reason says so)."""

    device_type = "cuda"


def _triton_reasons(tensors: list[Tensor]) -> list[str]:
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError as e:
        reasons.append(f"triton is not importable ({e})")
    devices = {t.device.type for t in tensors}
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if devices != {"cuda"} and not (interpret and devices == {"cpu"}):
        reasons.append(f"needs all tensors on cuda (or on cpu with TRITON_INTERPRET=1), got {sorted(devices)}")
    return reasons


def _triton_row_dtype_reasons(logits: list[Tensor]) -> list[str]:
    """The row kernels (kd_loss, codistill_loss) are compiled for float32 / bfloat16 / float16 logits only
    (triton/launch.py: ROW_KERNEL_GPU_DTYPES); float64 runs in the interpreter (tests), on a GPU on the reference."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and any(t.dtype == torch.float64 for t in logits):
        return ["float64 logits: the Triton kernels are compiled for float32/bfloat16/float16 (the reference "
                "backend computes float64 exactly)"]  # fmt: skip
    return []


class TritonBackend(Backend):
    """Triton kernels (fastdistill/ops/triton). CUDA tensors; CPU tensors too under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    max_teachers = 16  # kd_loss.MAX_TEACHERS: each power-of-two bucket of K is one more set of compiled kernels

    def not_supported_reasons(self, inp: KDInputs) -> list[str]:
        reasons = _triton_reasons(inp.tensors()) + _dtype_reasons(inp)
        reasons += _triton_row_dtype_reasons([inp.student, *inp.teachers])
        if len(inp.teachers) > self.max_teachers:
            reasons.append(f"takes at most {self.max_teachers} teachers, got K = {len(inp.teachers)}")
        return reasons

    def __call__(self, inp: KDInputs) -> Tensor:
        from .triton.kd_loss import kd_loss_triton

        # One [K, N, V] tensor with unit stride along V: the caller's own when it came stacked (and needs no
        # cast); a list is stacked (one copy in the input dtype: pass a stacked tensor to avoid it).
        student, teachers = _kernel_dtypes(inp.student, inp.teachers)
        stacked = inp.teachers_stacked
        if stacked is None or teachers[0].dtype != stacked.dtype:
            stacked = torch.stack(teachers)
        if stacked.stride(-1) != 1:
            stacked = stacked.contiguous()
        if student.stride(-1) != 1:
            student = student.contiguous()
        grad_on = torch.is_grad_enabled()
        loss, _, _ = kd_loss_triton(
            student, stacked, inp.teacher_weights, inp.labels, inp.sample_weight, inp.denominator,
            inp.divergence, inp.ensemble, inp.temperature, inp.kd_scale, inp.ce_weight, inp.beta, inp.skew,
            inp.ignore_index, inp.reduce, grad_on and student.requires_grad, grad_on and stacked.requires_grad,
        )  # fmt: skip
        return loss


BACKENDS: dict[str, Backend] = {b.name: b for b in (CpuBackend(), CudaBackend(), TritonBackend(), ReferenceBackend())}
# "auto": fastest first, per device type.
PRIORITY = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


# ---------------------------------------------------------------------------------------------------------------------
# codistill_loss: two models distil into each other; the same scheme, one table of backends.


@dataclass
class CodistillInputs:
    """Validated, flattened arguments of :func:`fastdistill.codistill_loss` (see
    :func:`fastdistill.ops.reference.codistill_loss`)."""

    student: Tensor  # a: [N, V] (named like KDInputs' so dispatch reads the device the same way)
    b: Tensor  # [N, V], the dtype of a
    labels: Tensor | None  # int64 [N]
    sample_weight: Tensor | None  # [N]
    denominator: Tensor | None  # 0-dim
    divergence: str
    temperature: float
    kd_scale: float  # T^2 or 1
    weight_ab: float  # a -> b: in loss_b
    weight_ba: float  # b -> a: in loss_a
    hard_a: float
    hard_b: float
    beta: float
    skew: float
    ignore_index: int
    reduce: bool

    def tensors(self) -> list[Tensor]:
        optional = [self.labels, self.sample_weight, self.denominator]
        return [self.student, self.b, *(t for t in optional if t is not None)]

    def kernel_args(self) -> tuple:
        """The fused ops' arguments, with the gradient flags of this call (a and b in one dtype: float64 when
        either is, else their promotion, a copy only when they differ)."""
        a, b = self.student, self.b
        if a.dtype != b.dtype:
            common = torch.promote_types(a.dtype, b.dtype)
            a, b = a.to(common), b.to(common)
        grad_on = torch.is_grad_enabled()
        return (
            a, b, self.labels, self.sample_weight, self.denominator, self.divergence, self.temperature,
            self.kd_scale, self.weight_ab, self.weight_ba, self.hard_a, self.hard_b, self.beta, self.skew,
            self.ignore_index, self.reduce, grad_on and a.requires_grad, grad_on and b.requires_grad,
        )  # fmt: skip


class CoReferenceBackend(Backend):
    """Two reference kd_loss calls with stop-gradient targets: the spec in code."""

    name = "reference"

    def not_supported_reasons(self, inp: CodistillInputs) -> list[str]:
        return []

    def __call__(self, inp: CodistillInputs) -> tuple[Tensor, Tensor]:
        return reference.codistill_loss(
            inp.student, inp.b, labels=inp.labels, sample_weight=inp.sample_weight, denominator=inp.denominator,
            divergence_kind=inp.divergence, temperature=inp.temperature, kd_scale=inp.kd_scale,
            weight_ab=inp.weight_ab, weight_ba=inp.weight_ba, hard_a=inp.hard_a, hard_b=inp.hard_b, beta=inp.beta,
            skew=inp.skew, ignore_index=inp.ignore_index, reduce=inp.reduce,
        )  # fmt: skip


class CoExtensionBackend(ExtensionBackend):
    """``torch.ops.fastdistill.codistill_loss`` with a kernel for its device type."""

    op = "codistill_loss"
    def __call__(self, inp: CodistillInputs) -> tuple[Tensor, Tensor]:
        loss_a, loss_b, _, _ = torch.ops.fastdistill.codistill_loss(*inp.kernel_args())
        return loss_a, loss_b


class CoCpuBackend(CoExtensionBackend):
    """C++ kernel (csrc/cpu/codistill_cpu.cpp): both rows read once, both gradients written in the forward."""

    device_type = "cpu"


class CoCudaBackend(CoExtensionBackend):
    """CUDA C++: not written (the Triton kernel is the GPU backend); listed so ``backend="cuda"`` says so."""

    device_type = "cuda"


class CoTritonBackend(Backend):
    """Triton kernel (fastdistill/ops/triton/codistill_loss.py): one program per row, both models at once."""

    name = "triton"

    def not_supported_reasons(self, inp: CodistillInputs) -> list[str]:
        return _triton_reasons(inp.tensors()) + _triton_row_dtype_reasons(inp.tensors()[:2])

    def __call__(self, inp: CodistillInputs) -> tuple[Tensor, Tensor]:
        from .triton.codistill_loss import codistill_loss_triton

        args = list(inp.kernel_args())
        args[0], args[1] = args[0].contiguous(), args[1].contiguous()
        loss_a, loss_b, _, _ = codistill_loss_triton(*args)
        return loss_a, loss_b


CODISTILL_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CoCpuBackend(), CoCudaBackend(), CoTritonBackend(), CoReferenceBackend())
}


# ---------------------------------------------------------------------------------------------------------------------
# MI-alpha (SPEC §2): the same scheme, one table of backends.


@dataclass
class MIInputs:
    """Validated arguments of :func:`fastdistill.mi_alpha` (see :func:`fastdistill.ops.reference.mi_alpha`)."""

    student: Tensor  # [N, D], one dtype with teacher
    teacher: Tensor  # [N, D]
    log_baseline: float | Tensor  # float, or [N]
    alpha: float
    critic: str
    temperature: float

    def tensors(self) -> list[Tensor]:
        extra = [self.log_baseline] if isinstance(self.log_baseline, Tensor) else []
        return [self.student, self.teacher, *extra]

    def kernel_args(self) -> tuple[Tensor, Tensor, Tensor, float, float]:
        """The arguments of the fused ops: the critic applied (unit-norm rows for "cosine", so its gradient comes
        from autograd through the normalisation) and the log-baseline as an [N] tensor in the accumulation dtype."""
        u, v = self.student, self.teacher
        if self.critic == "cosine":
            u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
        acc = reference.compute_dtype(u)
        a = self.log_baseline
        a = a.to(acc) if isinstance(a, Tensor) else torch.full((u.shape[0],), float(a), dtype=acc, device=u.device)
        return u.contiguous(), v.contiguous(), a.contiguous(), self.alpha, self.temperature


class MIReferenceBackend(Backend):
    """The materialised N x N matrix, autograd for gradients: the spec in code."""

    name = "reference"

    def not_supported_reasons(self, inp: MIInputs) -> list[str]:
        return []

    def __call__(self, inp: MIInputs) -> Tensor:
        return reference.mi_alpha(inp.student, inp.teacher, alpha=inp.alpha, log_baseline=inp.log_baseline,
                                  critic=inp.critic, temperature=inp.temperature)  # fmt: skip


class MIExtensionBackend(ExtensionBackend):
    """``torch.ops.fastdistill.mi_alpha`` with a kernel for its device type."""

    op = "mi_alpha"
    def __call__(self, inp: MIInputs) -> Tensor:
        return torch.ops.fastdistill.mi_alpha(*inp.kernel_args())[0]


class MICpuBackend(MIExtensionBackend):
    """C++ kernel (csrc/cpu/mi_alpha_cpu.cpp): [B, N] score strips from BLAS, SIMD statistics."""

    device_type = "cpu"


class MICudaBackend(MIExtensionBackend):
    """CUDA C++: not written (the Triton kernels are the GPU backend); listed so ``backend="cuda"`` says so."""

    device_type = "cuda"


class MITritonBackend(Backend):
    """Triton kernels (fastdistill/ops/triton/mi_alpha.py): tiled tl.dot score tiles, flash-attention style."""

    name = "triton"

    def not_supported_reasons(self, inp: MIInputs) -> list[str]:
        return _triton_reasons(inp.tensors())

    def __call__(self, inp: MIInputs) -> Tensor:
        from .triton.mi_alpha import mi_alpha_triton

        return mi_alpha_triton(*inp.kernel_args())[0]


MI_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (MICpuBackend(), MICudaBackend(), MITritonBackend(), MIReferenceBackend())
}
_warned: set[tuple[str, str]] = set()


def select(name: str, inp, backends: dict[str, Backend] | None = None, op: str = "kd_loss") -> Backend:
    """The backend of ``backends`` (default: kd_loss's) that will run ``inp``: ``name`` itself, or for "auto" the
    first capable one in the device's priority order."""
    backends = BACKENDS if backends is None else backends
    if name != "auto":
        backend = backends[name]
        reasons = backend.not_supported_reasons(inp)
        if reasons:
            raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    device = inp.student.device.type
    order = PRIORITY.get(device, ("reference",))
    skipped: list[str] = []
    for candidate in order:
        reasons = backends[candidate].not_supported_reasons(inp)
        if not reasons:
            if candidate == "reference" and len(order) > 1 and (op, device) not in _warned:
                _warned.add((op, device))
                warnings.warn(
                    f"fastdistill: no fused {op} backend for {device} tensors, using the slow reference "
                    f"backend ({'; '.join(skipped)})",
                    stacklevel=4,
                )
            return backends[candidate]
        skipped.append(f"{candidate}: {', '.join(reasons)}")
    raise AssertionError("the reference backend runs everything")  # pragma: no cover
