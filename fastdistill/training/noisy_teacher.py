"""Moved to :mod:`fastdistill.methods.noisy_teacher`; the old path stays an alias of it (``sys.modules``)."""

import sys

from ..methods import noisy_teacher

sys.modules[__name__] = noisy_teacher
