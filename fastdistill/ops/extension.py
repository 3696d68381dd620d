"""Loads the compiled extension ``fastdistill._C`` once; the package keeps working without it.

``_C`` is a torch C++ extension: it links against the exact torch it was compiled with, whose C++ ABI changes with
every minor release, and wheel tags cannot express that. So setup.py's build_ext records the build's torch (and CUDA)
version in ``fastdistill/_build_info.py``, and this module compares it with the running torch before loading ``_C``:
on a major.minor mismatch it does not load ``_C`` at all (a mismatched one fails with an undefined symbol at best),
and ``IMPORT_ERROR`` (shown in the reference backend's fallback warning and in backend="cpu"'s error) names both
versions and the command that rebuilds ``_C`` against the running torch. Likewise a ``_C`` built with
``FASTDISTILL_CPU_ARCH=avx2`` (AVX2, FMA and F16C instructions) is not loaded on a CPU without them, where its first
op would die with SIGILL; the reason names the rebuild with ``FASTDISTILL_CPU_ARCH=generic``.

A failed compile fails the install (the extension is not optional); the package without ``_C`` is what an install
with ``FASTDISTILL_SKIP_EXT=1`` gives (or a checkout on ``sys.path`` that was never built): every op then runs on the
reference backend (or Triton, when asked for).
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


# FASTDISTILL_CPU_ARCH (setup.py) -> the CPU features its code needs (/proc/cpuinfo's names: -mavx2 -mfma -mf16c)
ARCH_FEATURES = {"avx2": ("avx2", "fma", "f16c"), "generic": ()}


def cpu_features() -> set[str] | None:
    """The running CPU's feature flags (lowercase, as /proc/cpuinfo names them), or None when unknown. Without
    /proc/cpuinfo, torch's own probe: AVX2 or better implies AVX2, FMA and F16C."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an old or unusual torch: unknown
        return None
    return set(ARCH_FEATURES["avx2"]) if capability in ("AVX2", "AVX512") else set()


def arch_mismatch(build: object, features: set[str] | None) -> str | None:
    """Why a ``_C`` built as ``build`` (fastdistill._build_info) cannot run on a CPU with ``features``, or None
    (also when either is unknown: a _build_info without CPU_ARCH, or no CPU flags to read)."""
    arch = getattr(build, "CPU_ARCH", None)
    if features is None or arch not in ARCH_FEATURES:
        return None
    missing = [f for f in ARCH_FEATURES[arch] if f not in features]
    if not missing:
        return None
    return (f"fastdistill._C was built with FASTDISTILL_CPU_ARCH={arch} ({', '.join(ARCH_FEATURES[arch]).upper()} "
            f"instructions), but this CPU (torch's CPU capability: {_capability()}) lacks {', '.join(missing)}, so "
            f"it is not loaded")  # fmt: skip


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


def _load() -> tuple[str | None, bool]:
    """(IMPORT_ERROR, whether it deserves a warning now: _C was built but cannot be used)."""
    if os.environ.get("FASTDISTILL_DISABLE_EXT", "0") == "1":  # run as if unbuilt (tests of the fallback)
        return "disabled by FASTDISTILL_DISABLE_EXT=1", False
    try:
        build = importlib.import_module("fastdistill._build_info")
    except ImportError:
        build = None  # not built (FASTDISTILL_SKIP_EXT=1, a never-compiled checkout), or built before _build_info
    running = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
    if build is not None:
        reason = mismatch(build, torch.__version__, torch.version.cuda)
        if reason is not None:
            return f"{reason}; {_rebuild()}", True
        reason = arch_mismatch(build, cpu_features())
        if reason is not None:
            where = "" if _from_checkout() else ", in the fastdistill source folder"
            return f"{reason}; rebuild it for this CPU{where}: FASTDISTILL_CPU_ARCH=generic {rebuild_command()}", True
    try:
        importlib.import_module("fastdistill._C")  # runs TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "fastdistill._C":
            return (f"fastdistill._C is not built (installed with FASTDISTILL_SKIP_EXT=1, or a source tree that was "
                    f"never compiled); {_rebuild('build')}"), False  # fmt: skip
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
