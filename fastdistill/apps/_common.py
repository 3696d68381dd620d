"""Helpers shared by the applications (``fastdistill demo``) and the experiments in ``examples/``: one torch thread
for reproducible CPU timings, and the paired confidence interval their tables report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..training.loop import torch_threads

__all__ = ["paired_ci", "single_thread"]

# two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def single_thread():
    """Run torch on one thread inside (see :func:`fastdistill.training.loop.torch_threads`)."""
    return torch_threads(1)


def paired_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean of the per-seed differences a - b and its 95% confidence interval (t distribution); None for 1 seed."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return None
    m = statistics.fmean(d)
    half = _T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half
