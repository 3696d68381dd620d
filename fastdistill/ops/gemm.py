"""The torch matmuls of the ops that call cuBLAS themselves (MI-alpha's strips, fused linear distillation's chunks):
half-precision operands with float32 results and float32 accumulators, on the tensor cores.

A float32 accumulator must not turn the matmul into a float32 one: ``c.addmm_(a.float(), b.float())`` runs on the
CUDA cores at ~1/10 of the bfloat16 rate (~60 against ~700 TFLOP/s on an H200). cuBLAS takes bfloat16 / float16
operands with a float32 C (``out_dtype=torch.float32``): products exact, sums in float32, C read and written once
in the GEMM's epilogue. On the CPU there is no such overload (``aten::mm.dtype`` is CUDA-only) and float32 operands
are what the CPU's kernels run anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

HAS_MM_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")
HALF = (torch.bfloat16, torch.float16)

# Whether this torch's addmm(out_dtype=float32) takes a float32 C: later releases accept it ("self dtype must match
# either out_dtype or mat1 dtype"), earlier ones with the overload wanted C in the operands' dtype. Learnt at the
# first call (None until then); where refused, the product is formed in float32 and added (one more [M, N] float32
# write and read, still on the tensor cores).
_ADDMM_FLOAT32_C: bool | None = None


def addmm_takes_float32_c() -> bool | None:
    """What :func:`add_mm` learnt of this torch on a GPU: True (cuBLAS adds into the float32 C), False (refused: a
    float32 product, then an add), None (not called on a GPU yet). The benchmarks record it."""
    return _ADDMM_FLOAT32_C


def is_traced(t: Tensor) -> bool:
    """A fake or functional tensor: torch.compile is tracing the op (no data, no pointer)."""
    return type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t)


def mm32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32 from half-precision ``a`` [M, K] and ``b`` [K, N]: cuBLAS with float32 output on a GPU;
    on the CPU float32 operands (half products are exact in float32)."""
    if a.is_cuda and HAS_MM_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def add_mm(c: Tensor, a: Tensor, b: Tensor) -> None:
    """``c += a @ b`` in place: ``c`` [M, N] in the operands' dtype (a plain ``addmm_``), or float32 with half-precision
    ``a`` [M, K], ``b`` [K, N] (cuBLAS's float32 C on a GPU, beta = 1). While torch.compile traces it, a float32
    product and an add (Inductor has no lowering of addmm with out_dtype: pytorch/pytorch#163880)."""
    global _ADDMM_FLOAT32_C
    if c.dtype == a.dtype:
        c.addmm_(a, b)
        return
    if c.dtype != torch.float32 or a.dtype not in HALF:
        raise TypeError(f"add_mm: a float32 accumulator for half-precision operands, got c {c.dtype}, a {a.dtype}")
    b = b.to(a.dtype)  # under autocast, a half-precision product's gradient against float32 inputs
    if not a.is_cuda or not HAS_MM_DTYPE:
        c.addmm_(a.float(), b.float())
        return
    if not is_traced(c) and _ADDMM_FLOAT32_C is not False:
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            _ADDMM_FLOAT32_C = True
            return
        except RuntimeError as e:  # the argument check, before any launch
            if _ADDMM_FLOAT32_C or "dtype" not in str(e):
                raise
            _ADDMM_FLOAT32_C = False
    c.add_(mm32(a, b))
