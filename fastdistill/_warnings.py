"""Warnings attributed to the user's line: the first frame outside this package and torch's call machinery
(``nn.Module.__call__``, autograd), however deep the call that warns (``KDLoss``, ``fused_linear_kd_loss`` and the
training loop reach the ops through different depths, so a fixed ``stacklevel`` names a line inside fastdistill or
torch, or none)."""

from __future__ import annotations

import os
import sys
import warnings

PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside(frame) -> bool:
    name = frame.f_globals.get("__name__") or ""
    return frame.f_code.co_filename.startswith(PACKAGE) or name == "torch" or name.startswith("torch.")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside fastdistill and torch."""
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
