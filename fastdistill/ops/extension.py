"""Loads the compiled extension ``fastdistill._C`` once; the package keeps working without it.

``_C`` is a torch C++ extension: it links against the exact torch it was compiled with, whose C++ ABI changes with
every minor release, and wheel tags cannot express that. So setup.py's build_ext records the build's torch (and CUDA)
version in ``fastdistill/_build_info.py``, and this module compares it with the running torch before loading ``_C``:
on a major.minor mismatch it does not load ``_C`` at all (a mismatched one fails with an undefined symbol at best),
and ``IMPORT_ERROR`` (shown in the reference backend's fallback warning and in backend="cpu"'s error) names both
versions and the command that rebuilds ``_C`` against the running torch.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against without an rpath)

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE = os.path.dirname(_PACKAGE)  # the checkout, when fastdistill is imported from one (an editable install)


def _from_checkout() -> bool:
    return os.path.isfile(os.path.join(_SOURCE, "setup.py")) and os.path.isdir(os.path.join(_SOURCE, "csrc"))


def rebuild_command() -> str:
    """The one command that compiles ``_C`` against the running torch and reinstalls only fastdistill (an editable
    install of this checkout; else a reinstall, run in the fastdistill source folder)."""
    pip = f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation --no-deps"
    return f"{pip} -e {shlex.quote(_SOURCE)}" if _from_checkout() else f"{pip} --force-reinstall ."


def _rebuild(verb: str = "rebuild") -> str:
    where = "" if _from_checkout() else ", in the fastdistill source folder"
    return f"{verb} it for the running torch {torch.__version__}{where}: {rebuild_command()}"


def _major_minor(version: str | None) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def mismatch(build: object, torch_version: str, cuda_version: str | None) -> str | None:
    """Why a ``_C`` built as ``build`` (fastdistill._build_info) cannot run under this torch, or None."""
    built_torch = getattr(build, "TORCH_VERSION", None)
    if _major_minor(built_torch) != _major_minor(torch_version):
        return f"fastdistill._C was built against torch {built_torch}, but torch {torch_version} is running"
    built_cuda = getattr(build, "CUDA_VERSION", None)
    if getattr(build, "WITH_CUDA", False) and (cuda_version or "").split(".")[0] != (built_cuda or "").split(".")[0]:
        return (f"fastdistill._C's CUDA kernels were built against CUDA {built_cuda} (torch {built_torch}), but the "
                f"running torch {torch_version} has CUDA {cuda_version}")  # fmt: skip
    return None


def _load() -> tuple[str | None, bool]:
    """(IMPORT_ERROR, whether it deserves a warning now: _C was built but cannot be used)."""
    if os.environ.get("FASTDISTILL_DISABLE_EXT", "0") == "1":  # run as if unbuilt (tests of the fallback)
        return "disabled by FASTDISTILL_DISABLE_EXT=1", False
    try:
        build = importlib.import_module("fastdistill._build_info")
    except ImportError:
        build = None  # not built (FASTDISTILL_SKIP_EXT=1, a failed build), or built before _build_info existed
    running = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    if build is not None:
        reason = mismatch(build, torch.__version__, torch.version.cuda)
        if reason is not None:
            return f"{reason}; {_rebuild()}", True
    try:
        importlib.import_module("fastdistill._C")  # runs TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "fastdistill._C":
            return (f"fastdistill._C is not built (installed with FASTDISTILL_SKIP_EXT=1, or its build failed); "
                    f"{_rebuild('build')}"), False  # fmt: skip
        built = f"built against torch {build.TORCH_VERSION}" if build is not None else "built against an unknown torch"
        return f"fastdistill._C ({built}) failed to load with {running}: {type(e).__name__}: {e}; {_rebuild()}", True
    return None, False


IMPORT_ERROR: str | None
IMPORT_ERROR, _warn = _load()
if _warn:
    warnings.warn(f"{IMPORT_ERROR}; until then every op runs on the slow reference backend", stacklevel=1)


def available() -> bool:
    """True when the C++ ops (schemas and CPU kernels) are registered."""
    return IMPORT_ERROR is None


def _kernels() -> dict[str, set[str]]:
    """Which dispatch keys each op has kernels for; read once at import (registration happens at import), so
    dispatch decisions are plain Python constants that torch.compile can trace through."""
    if IMPORT_ERROR is not None:
        return {}
    ops = ("kd_loss", "codistill_loss", "mi_alpha")
    keys = ("CPU", "CUDA")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {op: {k for k in keys if has(f"fastdistill::{op}", k)} for op in ops}


KERNELS = _kernels()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``fastdistill::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return dispatch_key in KERNELS.get(op, ())
