"""Backend selection for every op: each backend says what it cannot run, and why.

Three kinds of backend (the C++ extension per device type, Triton, the reference) run any op record of
:mod:`fastdistill.ops.inputs`: the record knows its op's kernels and constraints, the backend its own. ``backend=
"auto"`` picks the first backend in the device's priority list whose ``not_supported_reasons`` is empty; a backend
named explicitly either runs or raises ``ValueError`` listing its reasons. Adding a backend means adding one kind
here, a method to the records, and its kernels elsewhere.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.autograd import forward_ad

from .._warnings import warn
from . import extension
from .inputs import OpInputs

BACKENDS_NAMES = ("auto", "cpu", "cuda", "triton", "reference")


class Backend:
    """A kind of backend; it runs any op record (:mod:`fastdistill.ops.inputs`) it has a kernel for."""

    name: str = ""

    def not_supported_reasons(self, inp: OpInputs) -> list[str]:
        raise NotImplementedError

    def __call__(self, inp: OpInputs) -> Any:
        raise NotImplementedError


class ExtensionBackend(Backend):
    """``torch.ops.fastdistill.<op>`` with a kernel of the C++ extension for ``device_type`` ("cpu": csrc/cpu;
    "cuda": csrc/cuda, ``kd_loss`` only, when the extension was built with a CUDA torch; its reasons say when there
    is none); the backend's name is the device type."""

    def __init__(self, device_type: str) -> None:
        self.name = self.device_type = device_type

    def not_supported_reasons(self, inp: OpInputs) -> list[str]:
        reasons = []
        if not extension.available():
            reasons.append(f"the fastdistill._C extension is not available ({extension.IMPORT_ERROR})")
        elif not extension.has_kernel(inp.OP, self.device_type.upper()):
            reasons.append(f"fastdistill._C has no {self.name} kernel for {inp.OP}")
        devices = {t.device.type for t in inp.tensors()}
        if devices != {self.device_type}:
            reasons.append(f"needs all tensors on {self.device_type}, got {sorted(devices)}")
        return reasons + inp.reasons("extension")

    def __call__(self, inp: OpInputs) -> Any:
        return inp.extension()


class TritonBackend(Backend):
    """Triton kernels (fastdistill/ops/triton). CUDA tensors; CPU tensors too under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def not_supported_reasons(self, inp: OpInputs) -> list[str]:
        reasons = []
        try:
            import triton  # noqa: F401
        except ImportError as e:
            reasons.append(f"triton is not importable ({e})")
        devices = {t.device.type for t in inp.tensors()}
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if devices != {"cuda"} and not (interpret and devices == {"cpu"}):
            reasons.append(f"needs all tensors on cuda (or on cpu with TRITON_INTERPRET=1), got {sorted(devices)}")
        return reasons + inp.reasons("triton")

    def __call__(self, inp: OpInputs) -> Any:
        return inp.triton()


class ReferenceBackend(Backend):
    """Pure PyTorch (fastdistill/ops/reference.py), autograd for gradients: the spec in code; runs anything."""

    name = "reference"

    def not_supported_reasons(self, inp: OpInputs) -> list[str]:
        return []

    def __call__(self, inp: OpInputs) -> Any:
        return inp.reference()


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ExtensionBackend("cpu"), ExtensionBackend("cuda"), TritonBackend(), ReferenceBackend())
}
# "auto": fastest first, per device type.
PRIORITY = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
_warned: set[tuple[str, str]] = set()

# "auto" on a GPU that a run measured: for kd_loss, the backend that was fastest at the nearest measured shape (V
# and K on a log scale) of the same GPU, dtype and divergence (else forward KL's), where it can run the call; else
# PRIORITY's order. (op, GPU name, dtype, divergence) -> [(V, K, backend)], written by `python -m
# benchmarks.auto_table RUN_DIR --write` from the run's kd and divergences rows; empty until a run has timed both
# GPU backends.
# <auto-measured>
AUTO_MEASURED: dict[tuple[str, str, str, str], list[tuple[int, int, str]]] = {}
# </auto-measured>


@torch.compiler.assume_constant_result
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_choice(op: str, gpu: str, dtype: str, divergence: str, v: int, k: int) -> str | None:
    """The backend AUTO_MEASURED names for a call of ``op`` with V = ``v``, K = ``k`` on ``gpu``, or None."""
    entries = AUTO_MEASURED.get((op, gpu, dtype, divergence)) or AUTO_MEASURED.get((op, gpu, dtype, "kl"))
    if not entries:
        return None
    return min(entries, key=lambda e: abs(math.log(e[0] / max(v, 1))) + abs(math.log(e[1] / max(k, 1))))[2]


def _measured(inp: OpInputs) -> str | None:
    if inp.OP != "kd_loss":
        return None
    s = inp.student
    index = s.device.index if s.device.index is not None else torch.cuda.current_device()
    return measured_choice(inp.OP, _gpu_name(index), str(s.dtype).removeprefix("torch."), inp.divergence,
                           s.shape[-1], len(inp.teachers))  # fmt: skip


def has_tangent(t: torch.Tensor) -> bool:
    """A forward-mode tangent rides on ``t`` (a dual tensor of a forward_ad level: torch.func.jvp / jacfwd's inputs
    are too)."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def _transform_reason(inp: OpInputs) -> str | None:
    """Why no fused backend can run ``inp`` under a transform: forward-mode AD (their kernels have no forward
    derivative: torch would run them on the primal values and drop the tangent, a derivative of 0 without an error),
    or inputs that a torch.func gradient transform tracks (grad / vjp / jacrev: torch's own error would not say
    what to do), or vmapped inputs of an op that takes a list of tensors (kd_loss's teachers: torch has no fallback
    for it). None otherwise: a transform over tensors the op only closes over, or vmap of the other ops (the forward
    runs, torch's fallback loops over the batch; a backward through it is the RuntimeError of
    registration._computed)."""
    # (torch.func.jvp / jacfwd's inputs are dual tensors of a forward_ad level too)
    if any(has_tangent(t) for t in inp.tensors()):
        return ("forward-mode AD (torch.func.jvp / jacfwd / hessian, or a dual tensor of torch.autograd.forward_ad) "
                "needs backend='reference'")  # fmt: skip
    if any(torch._C._functorch.is_gradtrackingtensor(t) for t in inp.tensors()):
        return "inputs of a torch.func gradient transform (grad / vjp / jacrev / hessian) need backend='reference'"
    if any(kind == "Tensor[]" for _, kind in inp.ARGS) and any(
        torch._C._functorch.is_batchedtensor(t) for t in inp.tensors()
    ):  # torch's fallback batches an op by looping over it, but not one that takes a list of tensors
        return f"inputs batched by torch.func.vmap (the {inp.OP} op has no batching rule) need backend='reference'"
    return None


def select(name: str, inp: OpInputs) -> Backend:
    """The backend that will run ``inp``: ``name`` itself, or for "auto" the measured choice (AUTO_MEASURED) if
    any, else the first capable one in the priority order of the inputs' device. Inside a torch.func transform or
    forward-mode AD "auto" is the reference (plain torch ops, which every transform differentiates); a fused backend
    named there runs where it can (a transform over closed-over tensors) and is refused otherwise."""
    backends, op = BACKENDS, inp.OP
    # (eager only: under torch.compile the transforms are traced by Dynamo and no dual tensor reaches here)
    transformed = not torch.compiler.is_compiling() and (
        forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
    )
    if name != "auto":
        backend = backends[name]
        reasons = backend.not_supported_reasons(inp)
        if transformed and name != "reference":
            reasons += [r for r in (_transform_reason(inp),) if r is not None]
        if reasons:
            raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    if transformed:
        return backends["reference"]
    device = inp.tensors()[0].device.type
    if device == "cuda" and AUTO_MEASURED:
        choice = _measured(inp)
        if choice is not None and not backends[choice].not_supported_reasons(inp):
            return backends[choice]
    order = PRIORITY.get(device, ("reference",))
    skipped: list[str] = []
    for candidate in order:
        reasons = backends[candidate].not_supported_reasons(inp)
        if not reasons:
            if candidate == "reference" and len(order) > 1 and (op, device) not in _warned:
                _warned.add((op, device))
                warn(f"fastdistill: no fused {op} backend for {device} tensors, using the slow reference "
                     f"backend ({'; '.join(skipped)})")
            return backends[candidate]
        skipped.append(f"{candidate}: {', '.join(reasons)}")
    raise AssertionError("the reference backend runs everything")  # pragma: no cover
