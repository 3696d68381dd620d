"""Backward's scaling of a saved gradient by grad_output, in place, skipped on the device where grad_output is 1.

The row ops compute their gradients in the forward launch; backward multiplies them by grad_output
(``registration._scale``). On CUDA, asking whether grad_output is exactly 1 from the host is a device sync, so
``mul_`` always read and wrote the whole gradient: 2 of the K + 4 passes of bf16 [N, V] traffic at K = 1 for a plain
``loss.backward()`` (benchmarks/NOTES.md, issue 17). Here every program reads its factor itself and returns at once
when it is 1: ``grad * 1`` is ``grad`` bit for bit, so skipping it is exact, and nothing waits on the host.

Factors as ``registration._scale`` takes them: a 0-dim factor, or per row (``reduce=False``) an [N] float32 factor,
row r of the [R, V] view using factor r mod N (R = K N for the teachers' [K, N, V] gradient). The bits are those of
``registration._scale`` on the CPU (tests/test_scale.py): the product in float32, rounded once to the gradient's dtype.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import ROW_KERNEL_GPU_DTYPES, Launch, cdiv, int_tensor, is_aligned, jit_pair

BLOCK = 4096  # columns per tile: 16 per thread of 8 warps, two 16-byte vectors of bf16
PROGRAMS_PER_SM = 8  # the persistent grid of a 0-dim factor: 8 resident programs of 8 warps fill an SM


@triton.jit
def _scale_tile(g_ptr, r, c, V, f, BLOCK: tl.constexpr):
    """Columns [c BLOCK, (c + 1) BLOCK) of row r (int64) of the [R, V] gradient, times f, in place."""
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V.to(tl.int32)
    ptrs = g_ptr + r * V + cols
    x = tl.load(ptrs, mask=mask)
    if f.dtype == tl.float64:  # (float64 gradients: the interpreter only)
        y = x.to(tl.float64) * f
    else:  # the product in float32, rounded once
        y = x.to(tl.float32) * f.to(tl.float32)
    tl.store(ptrs, y.to(x.dtype), mask=mask)


def _scale_rows(g_ptr, f_ptr, int_ptr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """PER_ROW: program (r, c) scales tile c of row r by row r's factor. A 0-dim factor: a persistent grid of P
    programs, each reading the factor once and returning at once when it is 1 (the plain ``loss.backward()``: one
    short wave, not R ceil(V / BLOCK) programs that each load the factor and exit); else program p scales tiles
    p, p + P, ... of the R x ceil(V / BLOCK) tiles."""
    V = tl.load(int_ptr + 0)
    N = tl.load(int_ptr + 1)
    if ALIGNED:  # the launcher checked V is a multiple of 16
        V = V // 16 * 16
    if PER_ROW:
        r = tl.program_id(0).to(tl.int64)
        f = tl.load(f_ptr + r % N)
        if f != 1:
            _scale_tile(g_ptr, r, tl.program_id(1), V, f, BLOCK)
    else:
        f = tl.load(f_ptr)
        if f != 1:
            R = tl.load(int_ptr + 2)
            C = tl.cdiv(V, BLOCK)
            for t in tl.range(tl.program_id(0).to(tl.int64), R * C, tl.num_programs(0).to(tl.int64)):
                _scale_tile(g_ptr, t // C, (t % C).to(tl.int32), V, f, BLOCK)


_scale_rows_kernel = jit_pair(_scale_rows, small=("f_ptr", "int_ptr"))
SCALE_DOMAINS = {"PER_ROW": (False, True), "BLOCK": (BLOCK,), "ALIGNED": (False, True)}
KERNELS = [_scale_rows_kernel]


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """The persistent grid's size on ``device``: PROGRAMS_PER_SM per SM on CUDA; 3 elsewhere (the interpreter's CPU
    tensors: several tiles per program, as on a GPU; meta tensors of the compile test)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def scale_launch(grad: Tensor, factor: Tensor, n: int) -> Launch:
    """The launch that scales the contiguous gradient ``grad`` ([N, V] or [K, N, V]) in place by ``factor``: 0-dim,
    or [N] (one factor per row; float32, float64 for a float64 gradient). Works on meta tensors (aot.py)."""
    v = grad.shape[-1]
    rows = grad.numel() // v if v else 0
    per_row = factor.dim() == 1
    ints = int_tensor([v, n, rows], grad)
    aligned = is_aligned([grad], [v])
    tiles = rows * cdiv(v, BLOCK)
    grid = (rows, cdiv(v, BLOCK)) if per_row else (min(tiles, _programs(grad.device)),)
    return Launch(_scale_rows_kernel.pick(aligned), grid, (grad, factor.contiguous(), ints),
                  dict(PER_ROW=per_row, BLOCK=BLOCK, ALIGNED=aligned), {"num_warps": 8})  # fmt: skip


def scale_(grad: Tensor, factor: Tensor, n: int) -> Tensor:
    """grad *= factor in place (see the module docstring); returns grad."""
    scale_launch(grad, factor, n).run()
    return grad


def scale_space():
    """Every configuration: each gradient dtype, per row or not, aligned or not (the factors float32)."""
    for dtype in ROW_KERNEL_GPU_DTYPES:
        for v in (4096, 4097):
            g = torch.empty(2, 8, v, device="meta", dtype=dtype)
            yield scale_launch(g, torch.empty((), device="meta", dtype=torch.float32), 8)
            yield scale_launch(g, torch.empty(8, device="meta", dtype=torch.float32), 8)
