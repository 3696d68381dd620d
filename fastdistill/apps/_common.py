"""Helpers shared by the applications (``fastdistill demo``) and the experiments in ``examples/``: one torch thread
for reproducible CPU timings, the paired confidence interval their tables report, and loading one example script
from another (they are scripts, not a package)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from ..training.loop import torch_threads

__all__ = ["load_script", "map_seeds", "paired_ci", "single_thread"]
R = TypeVar("R")

# two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def single_thread() -> contextlib.AbstractContextManager[None]:
    """Run torch on one thread inside (see :func:`fastdistill.training.loop.torch_threads`)."""
    return torch_threads(1)


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean of the per-seed differences a - b and its two-sided ``level`` confidence interval (t distribution; a
    level other than 0.95, e.g. a Bonferroni-corrected one, needs scipy); None for 1 seed. ``a`` and ``b`` hold one
    value per seed, in the same seed order: lists of different lengths are a ValueError (not silently cut)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci pairs seed by seed: a has {len(a)} values and b has {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return None
    m = statistics.fmean(d)
    if level == 0.95 and len(d) - 1 in _T95:
        q = _T95[len(d) - 1]
    else:
        from scipy.stats import t

        q = float(t.ppf(0.5 + level / 2, len(d) - 1))
    half = q * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def load_script(path: str | Path, name: str) -> ModuleType:
    """The Python file ``path`` as module ``name`` (loaded once, then the same module): how one example script uses
    another's data and models. Registered in ``sys.modules`` first, where dataclasses look their module up."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(path))
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} as a Python module (expected a .py file)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # a script that failed is not "loaded": the next call runs it again
            raise
    return sys.modules[name]


def _single_threaded(fn: Callable[[int], R], seed: int) -> R:
    with single_thread():
        return fn(seed)


def map_seeds(fn: Callable[[int], R], seeds: Sequence[int], jobs: int = 1) -> list[R]:
    """``[fn(seed) for seed in seeds]`` on one torch thread: here, one after another, or with ``jobs`` > 1 in that many
    spawned processes (the same numbers, less wall time). ``fn`` must pickle: a module-level function, or a
    ``functools.partial`` of one. Work is handed out one item at a time, in order, to whichever process is free (put
    the longest items first), so unequal items balance."""
    if jobs > 1 and len(seeds) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(jobs, len(seeds))) as pool:
            return pool.map(functools.partial(_single_threaded, fn), seeds, chunksize=1)
    return [_single_threaded(fn, seed) for seed in seeds]  # as in the processes: a thread count changes the bits
