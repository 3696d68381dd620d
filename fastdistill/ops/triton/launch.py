"""Every Triton launch of the project goes through here: a launcher builds a :class:`Launch` (which kernel object,
grid, runtime arguments, constexprs, options) from its inputs, ``run`` launches it, and ``fastdistill.ops.triton.aot``
compiles the very same ``Launch`` ahead of time for sm_90 / sm_80 without a GPU. A launcher that can choose a
configuration the ahead-of-time test does not compile cannot exist: the test enumerates each launcher's problem
space (``kd_space``, ``codistill_space``, ``mi_space``, next to the launchers) and calls the launcher itself.

Rules that keep the compiled signature a function of the constexprs alone (so the space is small and exact):
  - no scalar integer arguments: sizes, strides, flags and ``ignore_index`` reach the kernels in one int64 tensor
    (``int_tensor``), so every offset is computed in 64 bits from the start and Triton's value specialisation
    (an int equal to 1, divisible by 16, or past 2**31) never forks the compile;
  - float parameters in one tensor of the accumulation dtype (``param_tensor``): scalar float arguments would be
    rounded to float32;
  - each kernel exists twice (``jit_pair``): ``aligned``, used only when the launcher has checked that the large
    tensors' pointers are 16-byte aligned and their sizes / strides multiples of 16 (the kernel then restates that
    with ``x // 16 * 16`` under the ``ALIGNED`` constexpr, which gives 16-byte vector loads), and ``unaligned``,
    which never specialises on alignment;
  - kernels see no module globals but other ``@triton.jit`` functions and ``tl``: Inductor re-emits a user kernel's
    globals as source, and e.g. ``tl.constexpr(float("-inf"))`` comes back as the undefined name ``inf``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..gemm import is_traced

TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.int64: "i64", torch.int32: "i32"}  # fmt: skip
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The logits dtypes the row kernels (kd_loss, codistill_loss) are compiled for, student and teachers in any pair of
# them. float64 runs in Triton's interpreter (the tests' exact checks) but is not compiled for a GPU: each dtype is
# one more copy of every configuration, and on a GPU float64 logits go to the exact reference backend instead
# (dispatch says so).
ROW_KERNEL_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALIGN_BYTES = 16
ALIGN_ELEMS = 16  # sizes and strides: multiples of 16 elements (the divisibility Triton itself specialises on)


@dataclass(frozen=True)
class KernelPair:
    """One ``@triton.jit`` function compiled two ways (see the module docstring and ``jit_pair``)."""

    aligned: Any
    unaligned: Any

    def pick(self, aligned: bool) -> Any:
        return self.aligned if aligned else self.unaligned


def jit_pair(fn, small: tuple[str, ...] = ()) -> KernelPair:
    """Wrap the plain Python function ``fn`` as the two kernel objects of a :class:`KernelPair`. ``small``: pointer
    arguments never specialised on alignment even in ``aligned`` (per-row buffers, parameters: nothing to vectorise;
    names ``fn`` does not have are ignored, so one list may serve several kernels)."""
    import triton

    params = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    annotations = getattr(fn, "__annotations__", {})
    pointers = [p for p in params if p.endswith("_ptr")]
    small = tuple(p for p in small if p in params)
    scalars = [p for p in params if p not in pointers and p not in annotations]
    assert not scalars, f"{fn.__name__}: scalar arguments {scalars} must go through the int / param tensors"
    aligned = triton.jit(do_not_specialize_on_alignment=list(small))(fn)
    unaligned = triton.jit(do_not_specialize_on_alignment=pointers)(fn)
    return KernelPair(aligned, unaligned)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side sizes and grids. ``triton.cdiv`` is a ConstexprFunction in Triton 3.6: ~4 µs per
    call from Python, several per launch (benchmarks/NOTES.md, "Host time"; so is ``triton.next_power_of_2``)."""
    return -(-a // b)


def _pointer_aligned(t: Tensor) -> bool:
    if t.device.type == "meta":
        return True
    if not is_traced(t):
        return t.data_ptr() % ALIGN_BYTES == 0
    # fake / functional tensors while torch.compile traces the op: no pointer yet. Storages come from the caching
    # allocator, aligned far past 16 bytes (and Inductor copies misaligned graph inputs), so the storage offset
    # decides.
    return (t.storage_offset() * t.element_size()) % ALIGN_BYTES == 0


def is_aligned(tensors: list[Tensor], sizes: list[int]) -> bool:
    """True when every tensor's data pointer is 16-byte aligned and every size / stride is a multiple of 16."""
    return all(_pointer_aligned(t) for t in tensors) and all(s % ALIGN_ELEMS == 0 for s in sizes)


# Kernel-argument tensors of eager calls, by value: built once (one host-to-device copy), then reused, so that a call
# costs no small fills or stacks (~25 tiny kernels and ~0.1 ms of host time before the row kernel's launch). They
# are read-only for every kernel. A GPU entry belongs to the stream it was made on (the key holds it): its copy is
# asynchronous, ordered before that stream's kernels only, and when the cache, full, is cleared, its freed block
# goes back to that stream's pool, reused only after that stream's queued kernels. Bounded: cleared when full.
_CONSTANTS: dict[tuple, Tensor] = {}
_CONSTANTS_MAX = 1024


def is_eager(like: Tensor) -> bool:
    """Whether the call of ``like`` (one of its input tensors) runs eagerly on a real device: not on meta tensors, not
    traced by torch.compile (fake / functional tensors, Dynamo), not recorded into a CUDA graph."""
    if like.device.type == "meta" or is_traced(like) or torch.compiler.is_compiling():
        return False
    return not (like.is_cuda and torch.cuda.is_current_stream_capturing())


def _constant(key: tuple, values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cuda":
        key = (*key, torch.cuda.current_stream(device).cuda_stream)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= _CONSTANTS_MAX:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = _on_device(values, dtype, device)
    return t


def _on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``. To a GPU from pinned memory, asynchronously: torch.tensor(values,
    device=cuda) copies from pageable memory and waits for the GPU, a sync in every call with a new row count (the
    cache key holds N: dynamic padding, or tokens kept by ``labels != -100``). The caching host allocator keeps the
    pinned block until the copy is done."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def int_tensor(values: list[int], like: Tensor) -> Tensor:
    """Integer kernel arguments in one int64 tensor on ``like``'s device (see the module docstring): cached by value
    in eager calls; while tracing, built from 0-dim fills (torch.tensor(list) cannot run under the fake tensors of
    tracing), a symbolic size (torch.compile with dynamic shapes) staying symbolic (int() would guard on it)."""
    if not any(isinstance(x, torch.SymInt) for x in values) and is_eager(like):
        ints = tuple(int(x) for x in values)
        return _constant(("int", ints, like.device), ints, torch.int64, like.device)
    return torch.stack([torch.full((), x if isinstance(x, torch.SymInt) else int(x), dtype=torch.int64,
                                   device=like.device) for x in values])  # fmt: skip


def param_tensor(values: list[float], acc: torch.dtype, like: Tensor) -> Tensor:
    """Float kernel parameters in one tensor of the accumulation dtype (scalar arguments would be float32) on
    ``like``'s device; cached by value (bits: 0.0 and -0.0 differ) in eager calls, as ``int_tensor``."""
    floats = tuple(float(x) for x in values)
    if is_eager(like):
        key = ("float", tuple(x.hex() for x in floats), acc, like.device)
        return _constant(key, floats, acc, like.device)
    return torch.stack([torch.full((), x, dtype=acc, device=like.device) for x in floats])


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, **options)``. ``args`` are tensors only."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Tensor, ...]
    constexprs: dict[str, Any]
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4})

    def run(self) -> None:
        """Launch. While torch.compile traces it (or a dispatch mode watches), through ``torch.library.wrap_triton``,
        which records it; eagerly, the kernel itself: outside a triton_op's body wrap_triton would send an eager
        call through its higher-order op, ~0.2 ms of host time per launch, and register the kernel in a global
        table that is never cleared (the backward's scale runs there)."""
        if not all(g > 0 for g in self.grid):
            return
        watched = torch.utils._python_dispatch._get_current_dispatch_mode() is not None
        kernel = self.kernel
        options = self.options
        # (one call's tensors are all traced or none); Triton's interpreter runs plain Python functions, which only
        # torch >= 2.12's wrap_triton passes through (2.11 raises): nothing of them can be traced anyway
        if (watched or not is_eager(self.args[0])) and not INTERPRET:
            kernel = torch.library.wrap_triton(kernel)
            # Dynamo's Triton wrapper takes num_warps / num_stages as options but would read maxnreg as a kernel
            # argument: traced launches run with the registers ptxas picks (same results, perhaps lower occupancy)
            options = {k: v for k, v in options.items() if k != "maxnreg"}
        dev = self.args[0].device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            # Triton launches on the current device's current stream: a kernel given cuda:1 tensors while cuda:0 is
            # current would read them from the wrong context (the C++ backend guards the same way)
            with torch.cuda.device(dev):
                kernel[self.grid](*self.args, **self.constexprs, **options)
            return
        kernel[self.grid](*self.args, **self.constexprs, **options)


def check_row_dtype(op: str, dtype: torch.dtype) -> None:
    """Raise unless the row kernels of ``op`` are compiled for ``dtype`` (see ROW_KERNEL_GPU_DTYPES)."""
    if not INTERPRET and dtype not in ROW_KERNEL_GPU_DTYPES:
        raise TypeError(f"{op}: the Triton kernels take float32/bfloat16/float16 logits on a GPU, got {dtype} "
                        "(backend='reference' computes float64 exactly)")  # fmt: skip


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fast_math(dtype: torch.dtype) -> bool:
    """The FAST constexpr of the kernels (row_math.flog): PTX approximations, compiled kernels only (the interpreter
    runs no PTX) and float32 accumulation only."""
    return not INTERPRET and dtype != torch.float64


def tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32
