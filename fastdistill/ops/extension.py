"""Loads the compiled extension ``fastdistill._C`` once; the package keeps working without it."""

from __future__ import annotations

import importlib

IMPORT_ERROR: str | None = None
try:
    importlib.import_module("fastdistill._C")  # runs TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations
except ImportError as e:  # not built (FASTDISTILL_SKIP_EXT=1), or built against another torch
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available() -> bool:
    """True when the C++ ops (schemas and CPU kernels) are registered."""
    return IMPORT_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``fastdistill::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    import torch

    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdistill::{op}", dispatch_key)
